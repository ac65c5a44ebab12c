//! Checks fail loudly: `infill verify` prints PASS/FAIL per check and exits
//! 1 when one fails; a job's checks run after it, and a failed check stops
//! the jobs that depend on it. Jobs run in `depends_on` order.

mod common;

use common::{TestDb, text};

const SPEC: &str = r#"
[jobs.parents]
source.table = "users"
source.key = "id"
source.where = "status IS NULL"
action.update.status = "'active'"

[[jobs.parents.checks]]
name = "every user has a status"
sql = "SELECT COUNT(*) FROM users WHERE status IS NULL"
expect = 0

[[jobs.parents.checks]]
name = "users are all there"
sql = "SELECT COUNT(*) FROM users"
expect = { min = 100, max = 100 }

[jobs.children]
depends_on = ["parents"]
source.table = "entries"
source.key = "id"
source.where = "user_status IS NULL"
action.update.user_status = "(SELECT u.status FROM users u WHERE u.id = entries.user_id)"

[[jobs.children.checks]]
name = "entries of users with at least :min_id"
sql = "SELECT COUNT(*) FROM entries WHERE user_status IS NULL AND user_id >= :min_id"
expect = { max = 0 }
params.min_id = { type = "int", default = 1 }
"#;

async fn schema(db: &TestDb) {
    db.exec(
        "CREATE TABLE users (id BIGINT NOT NULL PRIMARY KEY, status VARCHAR(16));
         CREATE TABLE entries (id BIGINT NOT NULL PRIMARY KEY, user_id BIGINT NOT NULL, user_status VARCHAR(16));",
    )
    .await;
    db.exec(&format!(
        "INSERT INTO users (id, status) SELECT i, NULL FROM ({}) s",
        db.series(100)
    ))
    .await;
    db.exec(&format!(
        "INSERT INTO entries (id, user_id, user_status) SELECT i, 1 + i % 100, NULL FROM ({}) s",
        db.series(500)
    ))
    .await;
}

/// The id of the run group whose output this is, which it says stopped
/// (with the command that finishes it).
fn stopped_group(stderr: &str) -> String {
    let group = stderr
        .split("run group ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .expect("the group id is printed")
        .to_string();
    assert!(
        stderr.contains(&format!("finish it with: infill resume {group}")),
        "{stderr}"
    );
    group
}

fn spec_text() -> String {
    // params belong to the job, not the check table: move the declaration up.
    SPEC.replace("params.min_id = { type = \"int\", default = 1 }\n", "")
        .replace(
            "[jobs.children]\n",
            "[jobs.children]\nparams.min_id = { type = \"int\", default = 1 }\n",
        )
}

async fn verify_then_run_in_order(db: TestDb) {
    schema(&db).await;
    let spec = db.spec(&spec_text());
    let spec = spec.to_str().unwrap();

    let out = db.run(&["verify", spec]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL parents: every user has a status — got 100, expected 0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("PASS parents: users are all there — got 100, expected 100..=100"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAIL children: entries of users with at least :min_id — got 500, expected <= 0"),
        "{stdout}"
    );

    let out = db.run(&["verify", spec, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passed"], false);
    insta::assert_json_snapshot!("verify_before", v);

    // Running every job: parents first (children read the parents' status).
    let out = db.run(&["run", spec, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let jobs: Vec<String> = db
        .texts("SELECT job FROM infill_runs ORDER BY id")
        .await
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    assert_eq!(jobs, ["parents", "children"]);
    assert_eq!(
        db.int("SELECT COUNT(*) FROM entries WHERE user_status = 'active'")
            .await,
        500
    );

    let out = db.run(&["verify", spec, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    insta::assert_json_snapshot!("verify_after", v);

    // A param of a check is bound like any other.
    let out = db.run(&["verify", spec, "--job", "children", "--param", "min_id=1000"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
on_all_backends!(verify_then_run_in_order, verify_then_run_in_order);

async fn a_failed_check_stops_dependents(db: TestDb) {
    schema(&db).await;
    // A check that cannot hold after the parents job.
    let spec = db.spec(&spec_text().replace("expect = { min = 100, max = 100 }", "expect = { min = 101 }"));
    let out = db.run(&["run", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("check(s) failed: FAIL parents: users are all there — got 100, expected >= 101"),
        "{stderr}"
    );
    let runs = db.texts("SELECT job, status FROM infill_runs").await;
    assert_eq!(runs.len(), 1, "children never started: {runs:?}");
    assert_eq!(runs[0][1].as_deref(), Some("failed"));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM users WHERE status = 'active'").await,
        100,
        "the parents' writes stay"
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM entries WHERE user_status IS NOT NULL")
            .await,
        0
    );

    // The run was a group; with the check fixed, resuming the group
    // re-checks the failed job and runs its dependent, in the same group.
    let group = stopped_group(&stderr);
    db.spec(&spec_text());
    let out = db.run(&["resume", &group[..13]]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let runs = db
        .texts("SELECT job, status, group_id FROM infill_runs ORDER BY id")
        .await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    for (run, job) in runs.iter().zip(["parents", "children"]) {
        assert_eq!(run[0].as_deref(), Some(job));
        assert_eq!(run[1].as_deref(), Some("succeeded"), "{runs:?}");
        assert_eq!(run[2].as_deref(), Some(group.as_str()));
    }
    assert_eq!(
        db.int("SELECT COUNT(*) FROM entries WHERE user_status IS NULL").await,
        0
    );
}
on_all_backends!(a_failed_check_stops_dependents, a_failed_check_stops_dependents);

/// A canary of a group stops after the first job: the jobs after it read
/// its result, which the canary left unfinished. Resuming the group
/// finishes the first job, then runs the next.
async fn a_group_canary_stops_before_dependents(db: TestDb) {
    schema(&db).await;
    let without_status_check = spec_text().replace(
        "[[jobs.parents.checks]]\nname = \"every user has a status\"\nsql = \"SELECT COUNT(*) FROM users WHERE status IS NULL\"\nexpect = 0\n",
        "",
    );
    assert!(!without_status_check.contains("every user has a status"));
    let spec = db.spec(&without_status_check);
    let out = db.run(&["run", spec.to_str().unwrap(), "--canary", "10", "--batch-size", "5"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let runs = db.texts("SELECT job, status FROM infill_runs").await;
    assert_eq!(runs.len(), 1, "children never started: {runs:?}");
    assert_eq!(runs[0][1].as_deref(), Some("canary_passed"));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM entries WHERE user_status IS NOT NULL")
            .await,
        0
    );
    let group = stopped_group(&stderr);

    let out = db.run(&["resume", &group[..13]]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let runs = db.texts("SELECT job, status FROM infill_runs ORDER BY id").await;
    let runs: Vec<(Option<String>, Option<String>)> = runs.into_iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    assert_eq!(
        runs,
        [
            (Some("parents".to_string()), Some("succeeded".to_string())),
            (Some("children".to_string()), Some("succeeded".to_string()))
        ]
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM entries WHERE user_status = 'active'")
            .await,
        500
    );
}
on_all_backends!(
    a_group_canary_stops_before_dependents,
    a_group_canary_stops_before_dependents
);

async fn canary_halts_then_resume_finishes(db: TestDb) {
    schema(&db).await;
    let body = |min: i64| {
        format!(
            r#"
[jobs.parents]
source.table = "users"
source.key = "id"
source.where = "status IS NULL"
action.update.status = "'active'"

[[jobs.parents.checks]]
name = "no user has a wrong status"
sql = "SELECT COUNT(*) FROM users WHERE status IS NOT NULL AND status <> 'active'"
expect = 0

[[jobs.parents.checks]]
name = "enough users are active"
sql = "SELECT COUNT(*) FROM users WHERE status = 'active'"
expect = {{ min = {min} }}
"#
        )
    };
    let spec = db.spec(&body(1));
    let spec = spec.to_str().unwrap();
    let out = db.run(&["run", spec, "--canary", "10", "--batch-size", "5", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"], "canary_passed");
    assert_eq!(summary["rows_changed"], 10);
    assert_eq!(summary["checks"].as_array().unwrap().len(), 2);
    assert_eq!(
        db.int("SELECT COUNT(*) FROM users WHERE status = 'active'").await,
        10,
        "the canary stops after 10 rows"
    );

    let id = summary["run_id"].as_str().unwrap().to_string();
    let out = db.run(&["resume", &id[..8], "--spec", spec, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"], "succeeded");
    assert_eq!(summary["run_id"], id.as_str());
    assert_eq!(db.int("SELECT COUNT(*) FROM users WHERE status = 'active'").await, 100);

    // A canary whose checks fail halts with canary_failed; a plain run refuses to go on.
    db.exec("UPDATE users SET status = NULL").await;
    let spec = db.spec(&body(50));
    let spec = spec.to_str().unwrap();
    let out = db.run(&["run", spec, "--canary", "10", "--batch-size", "5"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canary failed: 1 check(s) failed after 10 rows"),
        "{stderr}"
    );
    let rows = db.texts("SELECT id, status FROM infill_runs ORDER BY id DESC").await;
    assert_eq!(rows[0][1].as_deref(), Some("canary_failed"));
    let out = db.run(&["run", spec]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failed its checks"),
        "{}",
        text(&out)
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM users WHERE status = 'active'").await, 10);
    let id = rows[0][0].clone().unwrap();
    let out = db.run(&["resume", &id[..13], "--spec", spec]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(db.int("SELECT COUNT(*) FROM users WHERE status = 'active'").await, 100);
}
on_all_backends!(canary_halts_then_resume_finishes, canary_halts_then_resume_finishes);
