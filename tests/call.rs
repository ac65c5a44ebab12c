//! `action.call`: one parameterised statement per candidate row, in the
//! batch's transaction (seed 003 scores each session with a SQL function).
//! `:name` binds a param or a column of the row. Each row's call commits
//! with its checkpoint, so a second run calls nothing again; a row whose
//! call fails is isolated and recorded, the others go through.

mod common;

use common::{Backend, TestDb, text};

async fn schema(db: &TestDb) {
    db.exec(
        "CREATE TABLE sessions (id BIGINT NOT NULL PRIMARY KEY, minutes INTEGER NOT NULL);
         CREATE TABLE scores (session_id BIGINT NOT NULL PRIMARY KEY, model VARCHAR(20) NOT NULL, score INTEGER NOT NULL,
                              CHECK (session_id <> 13));",
    )
    .await;
    db.exec(&format!(
        "INSERT INTO sessions (id, minutes) SELECT i, i % 50 FROM ({}) s",
        db.series(500)
    ))
    .await;
    match db.backend {
        Backend::Postgres => {
            db.exec(
                "CREATE FUNCTION score_session(sid BIGINT, model TEXT) RETURNS INTEGER AS $$
                 BEGIN
                   INSERT INTO scores (session_id, model, score)
                   SELECT s.id, model, s.minutes * 2 FROM sessions s WHERE s.id = sid;
                   RETURN 1;
                 END $$ LANGUAGE plpgsql",
            )
            .await
        }
        Backend::MySql => {
            db.exec(
                "CREATE PROCEDURE score_session(IN sid BIGINT, IN model VARCHAR(20))
                 INSERT INTO scores (session_id, model, score) SELECT s.id, model, s.minutes * 2 FROM sessions s WHERE s.id = sid",
            )
            .await
        }
        Backend::Sqlite => {}
    }
}

fn call_sql(db: &TestDb) -> &'static str {
    match db.backend {
        Backend::Postgres => "SELECT score_session(:id, :model)",
        Backend::MySql => "CALL score_session(:id, :model)",
        // SQLite has no stored code: the statement does the work itself.
        Backend::Sqlite => "INSERT INTO scores (session_id, model, score) VALUES (:id, :model, :minutes * 2)",
    }
}

async fn calls_each_candidate_once(db: TestDb) {
    schema(&db).await;
    let spec = db.spec(&format!(
        r#"
[jobs.score]
source.table = "sessions"
source.key = "id"
source.where = "minutes > 0 AND NOT EXISTS (SELECT 1 FROM scores c WHERE c.session_id = sessions.id)"
action.call = "{}"
params.model = {{ type = "text", default = "v1.2" }}
batch_size = 64
max_failures = 1
"#,
        call_sql(&db)
    ));
    let spec = spec.to_str().unwrap();

    let plan = db.run(&["plan", spec, "--json"]);
    assert!(plan.status.success(), "{}", text(&plan));
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["jobs"][0]["candidates"], 490);
    assert_eq!(db.int("SELECT COUNT(*) FROM scores").await, 0, "plan calls nothing");

    let out = db.run(&["run", spec, "--json"]);
    assert_eq!(out.status.code(), Some(1), "one row failed: {}", text(&out));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM scores").await,
        489,
        "every candidate but the poison one"
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM scores c JOIN sessions s ON s.id = c.session_id WHERE c.score <> s.minutes * 2 OR c.model <> 'v1.2'")
            .await,
        0,
        "the row's column and the param were bound"
    );
    let failures = db.texts("SELECT row_key FROM infill_failures").await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0][0].as_deref().unwrap().contains("13"), "{failures:?}");

    // Nothing is called twice: the next run finds only the poison row.
    let out = db.run(&["run", spec, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(db.int("SELECT COUNT(*) FROM scores").await, 489);
    // A call has no undo images.
    let runs = db.texts("SELECT id FROM infill_runs ORDER BY id").await;
    let undo = db.run(&["undo", &runs[0][0].as_deref().unwrap()[..13]]);
    assert_eq!(undo.status.code(), Some(4), "{}", text(&undo));
}
on_all_backends!(calls_each_candidate_once, calls_each_candidate_once);

async fn unknown_binds_are_named(db: TestDb) {
    schema(&db).await;
    let spec = db.spec(
        r#"
[jobs.score]
source.table = "sessions"
source.key = "id"
action.call = "INSERT INTO scores (session_id, model, score) VALUES (:id, 'x', :minutez)"
"#,
    );
    let out = db.run(&["plan", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("jobs.score.action.call"), "{err}");
    assert!(
        err.contains(":minutez is neither a param of the job nor a column"),
        "{err}"
    );
}
on_all_backends!(unknown_binds_are_named, unknown_binds_are_named);
