//! The examples under examples/ run as written: seed 002's runbook (three
//! jobs in dependency order, each with its validation) with either fix for
//! orphans, seed 003's plan, approval, priority canary and checks, and seed
//! 004's webhook replay of the activities a diff finds missing, and its
//! fixture export. Each gets a fresh PostgreSQL database loaded from the
//! example's setup.sql.

mod common;

use std::path::Path;

use common::{Backend, TestDb, text};

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)
}

/// A database loaded with the example's data, and its spec files copied
/// into the test's folder.
async fn setup(name: &str, specs: &[&str]) -> Option<TestDb> {
    let db = TestDb::new(Backend::Postgres).await?;
    db.exec(&std::fs::read_to_string(example(name).join("setup.sql")).unwrap())
        .await;
    for spec in specs {
        if let Some(dir) = Path::new(spec).parent() {
            std::fs::create_dir_all(db.path().join(dir)).unwrap();
        }
        std::fs::copy(example(name).join(spec), db.path().join(spec)).unwrap();
    }
    Some(db)
}

fn infill(db: &TestDb, user: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = db
        .infill()
        .env("DATABASE_URL", &db.url)
        .env("USER", user)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        text(&out),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_002_runbook_creates_the_missing_parties() {
    let Some(db) = setup("seed-002-runbook", &["infill.toml"]).await else {
        return;
    };
    let orphans = r#"SELECT COUNT(*) FROM "WaitlistEntry" w WHERE w."clientPartyId" IS NOT NULL AND NOT EXISTS (SELECT 1 FROM "Party" p WHERE p.id = w."clientPartyId")"#;
    let missing_parties = db
        .int(&format!(
            r#"SELECT COUNT(DISTINCT "clientPartyId") FROM "WaitlistEntry" w WHERE {}"#,
            orphans.split_once(" WHERE ").unwrap().1
        ))
        .await;
    assert!(missing_parties > 0 && db.int(orphans).await > 0);

    let (code, _, out) = infill(&db, "ops", &["verify"]);
    assert_eq!(code, Some(1), "the validations fail before: {out}");
    let (code, _, out) = infill(&db, "ops", &["run", "--yes"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("run group"), "{out}");
    let (code, _, out) = infill(&db, "ops", &["verify"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(db.int(orphans).await, 0);
    assert_eq!(
        db.int(r#"SELECT COUNT(*) FROM "Party" WHERE name = 'Recovered Party'"#)
            .await,
        missing_parties,
        "each missing party created once"
    );
    assert_eq!(
        db.int(r#"SELECT COUNT(*) FROM "User" WHERE "partyId" IS NULL"#).await,
        0
    );
    // Jobs ran in dependency order.
    let jobs = db.texts("SELECT job FROM infill_runs ORDER BY id").await;
    let jobs: Vec<&str> = jobs.iter().map(|r| r[0].as_deref().unwrap()).collect();
    assert_eq!(jobs, ["user_party", "waitlist_party", "recover_parties"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_002_runbook_or_nullifies_the_orphans() {
    let Some(db) = setup("seed-002-runbook", &["nullify.toml"]).await else {
        return;
    };
    let orphaned = db
        .int(r#"SELECT COUNT(*) FROM "WaitlistEntry" w WHERE w."clientPartyId" > 2000"#)
        .await;
    let (code, _, out) = infill(&db, "ops", &["run", "nullify.toml", "--yes", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, _, out) = infill(&db, "ops", &["verify", "nullify.toml"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        db.int(r#"SELECT COUNT(*) FROM "WaitlistEntry" WHERE "clientPartyId" > 2000"#)
            .await,
        0
    );
    // And back: undo restores the references it cleared.
    let id = db.texts("SELECT id FROM infill_runs").await[0][0].clone().unwrap();
    let (code, _, out) = infill(&db, "ops", &["undo", &id[..13], "--spec", "nullify.toml", "--yes"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        db.int(r#"SELECT COUNT(*) FROM "WaitlistEntry" WHERE "clientPartyId" > 2000"#)
            .await,
        orphaned
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_003_plan_approve_priority_canary_and_pass() {
    let Some(db) = setup("seed-003-plan", &["infill.toml"]).await else {
        return;
    };
    let candidates = "status = 'completed' AND completed_at >= '2025-08-01' AND NOT EXISTS (SELECT 1 FROM fc_scores f WHERE f.session_id = sessions.id)";
    let count = |extra: &str| format!("SELECT COUNT(*) FROM sessions WHERE {candidates} AND ({extra})");
    let (code, stdout, out) = infill(&db, "bob", &["plan", "--out", "plan.json", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let fc = &plan["jobs"][0];
    assert_eq!(fc["job"], "fc_scores");
    assert_eq!(fc["candidates"].as_i64(), Some(db.int(&count("true")).await));
    let categories: Vec<(String, i64)> = fc["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c["rows"].as_i64().unwrap()))
        .collect();
    let with_profile = "EXISTS (SELECT 1 FROM profiles p WHERE p.session_id = sessions.id)";
    assert_eq!(
        categories,
        vec![
            ("fc_only".to_string(), db.int(&count(with_profile)).await),
            (
                "profile_and_fc".to_string(),
                db.int(&count(&format!("NOT {with_profile}"))).await
            ),
        ]
    );
    assert_eq!(fc["priority"][0]["rows"], 2, "the two test sessions");

    // The gate: no approval, then alice approves and bob runs.
    let (code, _, out) = infill(&db, "bob", &["run", "--job", "fc_scores", "--yes"]);
    assert_eq!(code, Some(3), "{out}");
    let (code, _, out) = infill(
        &db,
        "alice",
        &["approve", "plan.json", "--by", "alice", "--note", "phase 1 plan"],
    );
    assert_eq!(code, Some(0), "{out}");
    let (code, _, out) = infill(&db, "alice", &["run", "--job", "fc_scores", "--yes"]);
    assert_eq!(code, Some(3), "the approver may not run it: {out}");

    // The priority canary: the test sessions come first, and its checks hold.
    let (code, stdout, out) = infill(
        &db,
        "bob",
        &["run", "--job", "fc_scores", "--canary", "5", "--yes", "--json"],
    );
    assert_eq!(code, Some(0), "{out}");
    let canary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(canary["status"], "canary_passed");
    assert_eq!(
        db.int("SELECT COUNT(*) FROM sessions s JOIN fc_scores f ON f.session_id = s.id WHERE s.is_test")
            .await,
        2
    );
    let run = canary["run_id"].as_str().unwrap().to_string();
    let (code, _, out) = infill(&db, "bob", &["resume", &run[..13], "--yes"]);
    assert_eq!(code, Some(0), "{out}");
    let log = db.audit(Some(&run[..13]));
    let segments: Vec<i64> = log
        .iter()
        .filter(|l| l["event"] == "batch")
        .map(|l| l["segment"].as_i64().unwrap())
        .collect();
    assert!(
        segments.windows(2).all(|w| w[0] <= w[1]),
        "priority segments in order: {segments:?}"
    );

    let (code, _, out) = infill(&db, "bob", &["run", "--job", "profiles", "--yes"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, stdout, out) = infill(&db, "bob", &["verify", "--json"]);
    assert_eq!(code, Some(0), "PASS: {out}");
    let verdict: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(verdict["passed"], true);
    assert_eq!(verdict["checks"].as_array().unwrap().len(), 4);
}

/// A dispatcher on loopback that records each event's body and headers.
async fn dispatcher() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(serde_json::Value, String, String)>>>,
) {
    use axum::http::HeaderMap;
    type Got = std::sync::Arc<std::sync::Mutex<Vec<(serde_json::Value, String, String)>>>;
    let got: Got = Default::default();
    let app = axum::Router::new()
        .route(
            "/webhook",
            axum::routing::post(
                |axum::extract::State(got): axum::extract::State<Got>, headers: HeaderMap, body: String| async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    got.lock().unwrap().push((
                        serde_json::from_str(&body).unwrap(),
                        h("authorization"),
                        h("idempotency-key"),
                    ));
                    "ok"
                },
            ),
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_004_replays_the_missing_activities_and_exports_fixtures() {
    let Some(db) = setup("seed-004-replay", &["infill.toml", "templates/strava_event.json.j2"]).await else {
        return;
    };
    let (url, got) = dispatcher().await;
    let range = [
        "--param",
        "start_date=2024-03-01",
        "--param",
        "end_date=2024-03-31",
        "--param",
        "activity_type=Run",
    ];
    let missing = db
        .int(
            "SELECT COUNT(*) FROM old_activities o WHERE start_date >= '2024-03-01' AND start_date < '2024-04-01' \
             AND type = 'Run' AND NOT EXISTS (SELECT 1 FROM new_activities n WHERE n.id = o.id)",
        )
        .await;
    assert!(missing > 10, "the fixture has Runs missing in March");
    let mut args = vec!["run", "--job", "replay", "--rate", "200/s", "--json"];
    args.extend(range);
    let out = db
        .infill()
        .env("DATABASE_URL", &db.url)
        .env("DISPATCHER_URL", &url)
        .env("DISPATCHER_TOKEN", "dispatch-secret-4242")
        .args(&args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len() as i64, missing, "exactly the missing Runs of March");
    let (event, auth, key) = &got[0];
    assert_eq!(event["object_type"], "activity");
    assert_eq!(event["aspect_type"], "create");
    assert_eq!(event["subscription_id"], 12345);
    let id = event["object_id"].as_i64().unwrap();
    let row = db
        .texts(&format!(
            "SELECT athlete_id::text, extract(epoch FROM start_date)::bigint::text, type FROM old_activities WHERE id = {id}"
        ))
        .await;
    assert_eq!(event["owner_id"].to_string(), row[0][0].clone().unwrap());
    assert_eq!(event["event_time"].to_string(), row[0][1].clone().unwrap());
    assert_eq!(row[0][2].as_deref(), Some("Run"));
    assert_eq!(auth, "Bearer dispatch-secret-4242");
    assert!(key.starts_with("infill-"));
    let audit = std::fs::read_dir(db.path().join("infill_logs"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect::<String>();
    assert!(
        !audit.contains("dispatch-secret-4242"),
        "the token stays out of the audit log"
    );

    // The same events as fixtures, at most 5, without sending anything.
    let mut args = vec!["run", "--job", "fixtures", "--limit", "5"];
    args.extend(range);
    let (code, _, out) = infill(&db, "ops", &args);
    assert_eq!(code, Some(0), "{out}");
    let fixtures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(db.path().join("fixtures/activities_sample.json")).unwrap())
            .unwrap();
    let fixtures = fixtures.as_array().unwrap();
    assert_eq!(fixtures.len(), 5);
    assert_eq!(
        fixtures[0],
        got.iter()
            .map(|g| g.0.clone())
            .min_by_key(|e| e["object_id"].as_i64())
            .unwrap()
    );
}
