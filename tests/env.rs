//! Environments: `--env E` picks `[env.E]`'s databases, settings and
//! dotenv file over `[databases]` and `[defaults]`; the command line wins
//! over both.

mod common;

use common::{Backend, TestDb, text};

#[tokio::test]
async fn env_overrides_databases_settings_and_dotenv() {
    let db = TestDb::new(Backend::Sqlite).await.expect("sqlite");
    db.exec("CREATE TABLE t (id BIGINT NOT NULL PRIMARY KEY, v INTEGER)")
        .await;
    db.exec(&format!(
        "INSERT INTO t (id, v) SELECT i, NULL FROM ({}) s",
        db.series(100)
    ))
    .await;
    std::fs::write(db.path().join(".env.dev"), "DEV_DB=sqlite:target.db\n").unwrap();
    let spec = db.path().join("infill.toml");
    std::fs::write(
        &spec,
        r#"
[databases]
target = "sqlite:no/such/folder/prod.db"

[defaults]
batch_size = 50

[env.dev]
dotenv = ".env.dev"
databases.target = "${DEV_DB}"
batch_size = 20

[jobs.fill]
source.table = "t"
source.key = "id"
source.where = "v IS NULL"
action.update.v = "7"
"#,
    )
    .unwrap();
    let spec = spec.to_str().unwrap();

    // Without --env, [databases] applies: that file does not exist.
    let out = db.run(&["run", spec]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no/such/folder/prod.db"),
        "{}",
        text(&out)
    );

    // With --env dev: the env's database (from its dotenv) and its batch size.
    let out = db.run(&["run", spec, "--env", "dev", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rows_changed"], 100);
    let log = db.audit(None);
    let first = log.iter().find(|l| l["event"] == "batch").unwrap();
    assert_eq!(first["batch_size"], 20, "the environment's batch_size");
    assert_eq!(log[0]["env"], "dev");
    assert_eq!(db.int("SELECT COUNT(*) FROM t WHERE v = 7").await, 100);

    // An unknown environment is a usage error naming the ones there are.
    let out = db.run(&["run", spec, "--env", "staging"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no environment `staging` (environments: dev)"),
        "{}",
        text(&out)
    );

    // The command line wins over the environment.
    db.exec("UPDATE t SET v = NULL").await;
    let out = db.run(&["run", spec, "--env", "dev", "--batch-size", "40", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let run_id = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let log = db.audit(Some(&run_id));
    assert_eq!(log.iter().find(|l| l["event"] == "batch").unwrap()["batch_size"], 40);
}
