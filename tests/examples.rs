//! The examples under examples/ run as written: seed 002's runbook (three
//! jobs in dependency order, each with its validation) with either fix for
//! orphans, and seed 003's plan, approval, priority canary and checks. Each
//! gets a fresh PostgreSQL database loaded from the example's setup.sql.

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
