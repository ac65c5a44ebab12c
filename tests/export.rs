//! `infill export` (seed 004's --export-fixtures): a job's source rows, or
//! the bodies its http action would send, to a JSON array or JSONL file,
//! without running the action; the file is replaced whole or not at all.

mod common;

use common::{Backend, TestDb, text};

async fn sessions(db: &TestDb) {
    db.exec(
        "CREATE TABLE sessions (id INTEGER PRIMARY KEY, user_name TEXT NOT NULL, score INTEGER, kind TEXT NOT NULL)",
    )
    .await;
    db.exec(&format!(
        "INSERT INTO sessions SELECT i, 'user ' || i, i * 3, CASE WHEN i % 2 = 0 THEN 'run' ELSE 'walk' END FROM ({}) s",
        db.series(50)
    ))
    .await;
}

const SPEC: &str = r#"
[jobs.replay]
source.table = "sessions"
source.key = "id"
source.where = "kind = :kind"
params.kind = { type = "text", default = "run" }
action.http.url = "http://127.0.0.1:9/never-called"
action.http.body = '{"id": {{ row.id }}, "who": {{ row.user_name }}, "kind": {{ params.kind }}}'

[jobs.fill]
source.table = "sessions"
source.key = "id"
source.where = "score > :min"
params.min = { type = "int", default = 140 }
action.update.score = "0"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_http_bodies_and_source_rows() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    sessions(&db).await;
    let spec = db.spec(SPEC);
    let spec = spec.to_str().unwrap();

    // The bodies an http job would send, as one JSON array.
    let out = db.run(&[
        "export",
        spec,
        "--job",
        "replay",
        "--out",
        "fixtures.json",
        "--limit",
        "3",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(db.path().join("fixtures.json")).unwrap()).unwrap();
    assert_eq!(
        got,
        serde_json::json!([
            {"id": 2, "who": "user 2", "kind": "run"},
            {"id": 4, "who": "user 4", "kind": "run"},
            {"id": 6, "who": "user 6", "kind": "run"},
        ])
    );

    // A job's candidate rows, one object per line, params applied.
    let out = db.run(&[
        "export",
        spec,
        "--job",
        "fill",
        "--out",
        "rows.jsonl",
        "--param",
        "min=141",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rows"], 3, "{summary}");
    assert_eq!(summary["format"], "jsonl");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(db.path().join("rows.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(
        lines[0],
        serde_json::json!({"id": 48, "user_name": "user 48", "score": 144, "kind": "run"})
    );
    // Nothing ran: no state, no write.
    assert!(!db.table_exists("infill_runs").await);
    assert_eq!(db.int("SELECT COUNT(*) FROM sessions WHERE score = 0").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_export_leaves_the_old_file() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    sessions(&db).await;
    let spec = db.spec(&SPEC.replace("{{ row.user_name }}", "{{ row.nope }}"));
    std::fs::write(db.path().join("fixtures.json"), "[\"old\"]\n").unwrap();
    let out = db.run(&[
        "export",
        spec.to_str().unwrap(),
        "--job",
        "replay",
        "--out",
        "fixtures.json",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("template error"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(db.path().join("fixtures.json")).unwrap(),
        "[\"old\"]\n"
    );
    let leftovers = std::fs::read_dir(db.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".infill-"))
        .count();
    assert_eq!(leftovers, 0, "no temporary file left behind");
}

/// `action.export` as a job's action: `infill run` writes the file (rows
/// through the template), `plan` shows the first items and writes nothing,
/// and a second run replaces the file whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_job_writes_its_file_on_run() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    sessions(&db).await;
    std::fs::create_dir_all(db.path().join("fixtures")).unwrap();
    let spec = db.spec(
        r#"
[jobs.fixtures]
source.table = "sessions"
source.key = "id"
source.where = "kind = :kind"
params.kind = { type = "text", default = "walk" }
action.export.path = "fixtures/sessions.json"
action.export.template = '{"session": {{ row.id }}, "who": {{ row.user_name }}}'
"#,
    );
    let spec = spec.to_str().unwrap();
    let file = db.path().join("fixtures/sessions.json");

    let out = db.run(&["plan", spec]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(r#"{"session": 1, "who": "user 1"}"#),
        "{}",
        text(&out)
    );
    assert!(!file.exists(), "plan writes nothing");

    let out = db.run(&["run", spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (summary["rows"].as_u64(), summary["format"].as_str()),
        (Some(25), Some("json"))
    );
    let got: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(got.as_array().unwrap().len(), 25);
    assert_eq!(got[1], serde_json::json!({"session": 3, "who": "user 3"}));

    db.exec("DELETE FROM sessions WHERE id > 10").await;
    let out = db.run(&["run", spec, "--param", "kind=run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("exported 5 rows of job fixtures"), "{}", text(&out));
    let got: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(
        got.as_array()
            .unwrap()
            .iter()
            .map(|x| x["session"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [2, 4, 6, 8, 10],
        "replaced whole"
    );
}
