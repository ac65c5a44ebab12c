//! Passwords never leave infill: a password in the target URL (written in
//! the spec or coming from a `${VAR}` of a `.env` file) appears in no output
//! of `run`, `run --dry-run` or `status`, in no audit log line and in no
//! state table. An unreachable or refusing database is reported with the
//! URL masked, exit code 4, and nothing written.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Backend, TestDb, text};

const PASSWORD: &str = "S3cretPassw0rd";

const JOB: &str = r#"
[jobs.fill]
source.table = "items"
source.key = "id"
source.where = "note IS NULL AND grp = :grp"
action.update.note = "'filled'"
params.grp = { type = "int", default = 1 }
"#;

async fn fixture(db: &TestDb) {
    db.exec("CREATE TABLE items (id BIGINT NOT NULL PRIMARY KEY, grp INTEGER NOT NULL, note VARCHAR(40))")
        .await;
    db.exec(&format!(
        "INSERT INTO items (id, grp, note) SELECT i, i % 3, NULL FROM ({}) s",
        db.series(300)
    ))
    .await;
}

/// `scheme://user@host/...` with `:password` after the user.
fn with_password(url: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, host) = rest.split_once('@').expect("the test server URL names a user");
    let user = user.split(':').next().unwrap();
    format!("{scheme}://{user}:{password}@{host}")
}

/// `with_password(url, "***")`: how infill shows the URL.
fn shown(url: &str) -> String {
    with_password(url, "***")
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("infill runs")
}

/// Asserts `secret` is in neither stream of `out`; returns both as one text.
fn clean(out: &Output, secret: &str) -> String {
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains(secret), "the password leaked:\n{}", text(out));
    all
}

/// Every value of every row of `table`, as the server's text, one line per value.
async fn table_text(db: &TestDb, table: &str) -> String {
    let columns_sql = match db.backend {
        Backend::Postgres => format!(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_catalog = current_database() AND table_name = '{table}' ORDER BY ordinal_position"
        ),
        Backend::MySql => format!(
            "SELECT CAST(column_name AS CHAR) FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = '{table}' ORDER BY ordinal_position"
        ),
        Backend::Sqlite => format!("SELECT name FROM pragma_table_info('{table}') ORDER BY cid"),
    };
    let columns: Vec<String> = db
        .texts(&columns_sql)
        .await
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    assert!(columns.len() >= 3, "columns of {table}: {columns:?}");
    let cast = |c: &String| match db.backend {
        Backend::MySql => format!("CAST({c} AS CHAR)"),
        _ => format!("CAST({c} AS TEXT)"),
    };
    let list = columns.iter().map(cast).collect::<Vec<_>>().join(", ");
    let rows = db.texts(&format!("SELECT {list} FROM {table}")).await;
    rows.into_iter().flatten().flatten().collect::<Vec<_>>().join("\n")
}

/// Every file of the audit log folder, concatenated.
fn audit_text(dir: &Path) -> String {
    let logs = dir.join("infill_logs");
    let mut all = String::new();
    for f in std::fs::read_dir(&logs).unwrap_or_else(|e| panic!("{}: {e}", logs.display())) {
        all.push_str(&std::fs::read_to_string(f.unwrap().path()).unwrap());
    }
    assert!(!all.is_empty(), "an audit log was written");
    all
}

/// Runs the job, a dry run, and both forms of status with the spec at
/// `spec`, whose target URL holds `secret`; asserts the secret is nowhere.
/// `shown_url` is the target URL as infill should show it (password masked).
async fn nothing_leaks(db: &TestDb, spec: &Path, secret: &str, shown_url: &str) {
    let spec_s = spec.to_str().unwrap();
    let candidates = db
        .int("SELECT COUNT(*) FROM items WHERE note IS NULL AND grp = 1")
        .await;
    assert!(candidates > 50);

    // Dry run, human and JSON: the target is shown, masked.
    let dry = output(db.infill().args(["run", spec_s, "--dry-run"]));
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    let dry_text = clean(&dry, secret);
    assert!(
        dry_text.contains(&format!("Dry run of job fill on {shown_url}: nothing was written.")),
        "{dry_text}"
    );
    let dry = output(db.infill().args(["run", spec_s, "--dry-run", "--json"]));
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    clean(&dry, secret);
    let report: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(report["target"], shown_url);
    assert_eq!(report["candidates"], candidates);

    // The run itself, with debug diagnostics on.
    let run = output(
        db.infill()
            .env("INFILL_LOG", "debug")
            .args(["run", spec_s, "--json", "--batch-size", "100"]),
    );
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    clean(&run, secret);
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["status"], "succeeded");
    assert_eq!(summary["rows_changed"], candidates);
    let run_id = summary["run_id"].as_str().unwrap().to_string();

    // Status: the list and one run, human and JSON.
    for args in [
        vec!["status", "--spec", spec_s, "--json"],
        vec!["status", "--spec", spec_s],
        vec!["status", &run_id, "--spec", spec_s],
        vec!["status", &run_id[..8], "--spec", spec_s, "--json"],
    ] {
        let out = output(db.infill().args(&args));
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        let all = clean(&out, secret);
        assert!(all.contains(&run_id[..8]), "{args:?} shows the run: {all}");
    }

    // The audit log names the target, masked.
    let audit = audit_text(db.path());
    assert!(
        !audit.contains(secret),
        "the password leaked into the audit log:\n{audit}"
    );
    assert!(audit.contains(&format!("\"target\":\"{shown_url}\"")), "{audit}");

    // The state tables hold no trace of it either.
    for table in ["infill_runs", "infill_batches", "infill_undo"] {
        let all = table_text(db, table).await;
        assert!(all.contains(&run_id), "{table} holds the run:\n{all}");
        assert!(!all.contains(secret), "the password leaked into {table}:\n{all}");
    }
    assert_eq!(db.undo_images(Some(&run_id)).await, candidates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_password_is_masked_everywhere_postgres() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    fixture(&db).await;
    // Trust authentication ignores the password, so the URL works.
    let url = with_password(&db.url, PASSWORD);
    let spec = db.spec_with_url(&url, JOB);
    nothing_leaks(&db, &spec, PASSWORD, &shown(&db.url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotenv_password_is_masked_everywhere_postgres() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    fixture(&db).await;
    let secret = "D0tenvSecretValue";
    std::fs::write(
        db.path().join(".env"),
        format!("# the target's password\nDB_PASSWORD={secret}\n"),
    )
    .unwrap();
    let url = with_password(&db.url, "${DB_PASSWORD}");
    let spec = db.spec_with_url(&url, JOB);
    assert!(std::fs::read_to_string(&spec).unwrap().contains("${DB_PASSWORD}"));
    // The variable comes from the .env file only.
    assert!(
        std::env::var("DB_PASSWORD").is_err(),
        "DB_PASSWORD must not be set in the test environment"
    );
    nothing_leaks(&db, &spec, secret, &shown(&db.url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_password_on_mariadb() {
    let Some(db) = TestDb::new(Backend::MySql).await else {
        return;
    };
    fixture(&db).await;
    let before = db.int("SELECT COUNT(*) FROM items WHERE note IS NULL").await;
    let url = with_password(&db.url, PASSWORD);
    let spec = db.spec_with_url(&url, JOB);
    let probe = output(db.infill().args(["run", spec.to_str().unwrap(), "--dry-run"]));
    clean(&probe, PASSWORD);
    if probe.status.code() == Some(0) {
        // The server accepts this password: the full round trip must not leak it.
        nothing_leaks(&db, &spec, PASSWORD, &shown(&db.url)).await;
        return;
    }
    // The server refuses the password (root has none): refused cleanly, masked, nothing written.
    for args in [
        vec!["run", spec.to_str().unwrap()],
        vec!["status", "--spec", spec.to_str().unwrap()],
    ] {
        let out = output(db.infill().args(&args));
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", text(&out));
        let err = clean(&out, PASSWORD);
        assert!(
            err.contains(&format!("cannot connect to database `target` ({})", shown(&db.url))),
            "{err}"
        );
        assert!(err.contains("Access denied"), "{err}");
        assert!(err.contains("nothing was written"), "{err}");
    }
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE note IS NULL").await, before);
    assert!(!db.table_exists("infill_runs").await);
    assert!(!db.path().join("infill_logs").exists());
}

/// A server that is down: `run` and `status` exit 4 naming the database,
/// showing the URL masked, saying nothing was written.
fn down_server(url_with_password: &str, secret: &str, shown_url: &str, dir: &TestDb) {
    let spec = dir.spec_with_url(url_with_password, JOB);
    let spec = spec.to_str().unwrap();
    for args in [
        vec!["run", spec],
        vec!["run", spec, "--dry-run"],
        vec!["status", "--spec", spec],
    ] {
        let started = Instant::now();
        let out = output(dir.infill().args(&args));
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", text(&out));
        let err = clean(&out, secret);
        assert!(out.stdout.is_empty(), "{}", text(&out));
        assert!(
            err.contains(&format!("error: cannot connect to database `target` ({shown_url}): ")),
            "names the database and shows the URL masked: {err}"
        );
        assert!(
            err.contains("Check that the server is up and the URL is right; nothing was written."),
            "{err}"
        );
        assert!(took < Duration::from_secs(30), "{args:?} gave up after {took:?}");
    }
    assert!(!dir.path().join("infill_logs").exists(), "no audit log");
}

#[tokio::test]
async fn postgres_server_down() {
    let dir = TestDb::new(Backend::Sqlite).await.unwrap();
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:1/infill_down");
    down_server(&url, PASSWORD, "postgres://app:***@127.0.0.1:1/infill_down", &dir);
}

#[tokio::test]
async fn mysql_server_down() {
    let dir = TestDb::new(Backend::Sqlite).await.unwrap();
    let url = format!("mysql://app:{PASSWORD}@127.0.0.1:1/infill_down");
    down_server(&url, PASSWORD, "mysql://app:***@127.0.0.1:1/infill_down", &dir);
}

#[tokio::test]
async fn server_down_with_a_dotenv_password() {
    let dir = TestDb::new(Backend::Sqlite).await.unwrap();
    let secret = "An0therD0tenvSecret";
    std::fs::write(dir.path().join(".env"), format!("DB_PASSWORD={secret}\n")).unwrap();
    down_server(
        "postgres://app:${DB_PASSWORD}@127.0.0.1:1/infill_down",
        secret,
        "postgres://app:***@127.0.0.1:1/infill_down",
        &dir,
    );
}

#[tokio::test]
async fn sqlite_file_that_does_not_exist() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let cases = [
        // Absolute, in a folder that does not exist either.
        (
            format!("sqlite://{}/missing/nothere.db", db.path().display()),
            db.path().join("missing/nothere.db"),
        ),
        // Relative to the spec's folder.
        ("sqlite:nothere.db".to_string(), db.path().join("nothere.db")),
    ];
    for (url, file) in cases {
        let spec = db.spec_with_url(&url, JOB);
        for args in [
            vec!["run", spec.to_str().unwrap()],
            vec!["status", "--spec", spec.to_str().unwrap()],
        ] {
            let out = output(db.infill().args(&args));
            assert!(matches!(out.status.code(), Some(2 | 4)), "{args:?}: {}", text(&out));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("database `target`"), "{err}");
            assert!(
                err.contains(&format!("(sqlite://{})", file.display())),
                "shows the file it looked for: {err}"
            );
            assert!(err.contains("unable to open database file"), "{err}");
            assert!(err.contains("nothing was written"), "{err}");
            assert!(!file.exists(), "{} must not be created", file.display());
        }
        assert!(!db.path().join("missing").exists());
    }
    assert!(!db.path().join("infill_logs").exists());
}
