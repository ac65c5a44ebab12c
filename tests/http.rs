//! `action.http` (seed 004's webhook replay) against a real HTTP server on
//! loopback (axum) that records what it receives: each record delivered
//! with its rendered body, headers and a stable Idempotency-Key; 503s with
//! Retry-After retried until delivered; a 400 dead-lettered, then sent
//! again by `--retry-failed` once the receiver is fixed; a kill -9
//! mid-replay resumes re-sending at most `concurrency` records; a template
//! naming an unknown field fails at plan naming its line; secrets stay out
//! of the audit log and the plan.

mod common;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::{Backend, TestDb, text};

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    key: String,
    body: serde_json::Value,
    auth: Option<String>,
    /// The status the receiver answered.
    status: u16,
}

#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<Received>>,
    /// Records with `id % fail_every == 0` answer 503 (Retry-After: 1) on
    /// their first attempt.
    flaky_every: Option<i64>,
    /// Records with `id % reject_every == 0` answer 400 until fixed.
    reject_every: Option<i64>,
    fixed: AtomicBool,
    delay: Duration,
}

async fn receive(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: String) -> impl IntoResponse {
    tokio::time::sleep(rx.delay).await;
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    let id = body["id"].as_i64().unwrap_or(0);
    let mut got = rx.got.lock().unwrap();
    let seen_before = got.iter().any(|r| r.key == key);
    let status = match (rx.flaky_every, rx.reject_every) {
        (Some(n), _) if id % n == 0 && !seen_before => 503,
        (_, Some(n)) if id % n == 0 && !rx.fixed.load(Ordering::SeqCst) => 400,
        _ => 200,
    };
    got.push(Received {
        key,
        body,
        auth: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(String::from),
        status,
    });
    drop(got);
    let code = StatusCode::from_u16(status).unwrap();
    let mut h = HeaderMap::new();
    if status == 503 {
        h.insert("retry-after", "1".parse().unwrap());
    }
    (code, h, if status == 400 { "invalid session payload" } else { "ok" })
}

/// Starts the receiver on a free loopback port; returns its URL.
async fn serve(rx: Arc<Receiver>) -> String {
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hook")
}

async fn sessions(db: &TestDb, n: u64) {
    db.exec(
        "CREATE TABLE sessions (id INTEGER PRIMARY KEY, user_name TEXT NOT NULL, score INTEGER, kind TEXT NOT NULL)",
    )
    .await;
    db.exec(&format!(
        "INSERT INTO sessions SELECT i, 'user \"' || i || '\"', i * 3, CASE WHEN i % 2 = 0 THEN 'run' ELSE 'walk' END FROM ({}) s",
        db.series(n)
    ))
    .await;
}

fn spec(db: &TestDb, url: &str, extra: &str) -> String {
    std::fs::write(db.path().join(".env"), "WEBHOOK_TOKEN=s3cr3t-token-value\n").unwrap();
    std::fs::create_dir_all(db.path().join("templates")).unwrap();
    std::fs::write(
        db.path().join("templates/session.json.j2"),
        "{\n  \"id\": {{ row.id }},\n  \"user\": {{ row.user_name }},\n  \"score\": {{ row.score }},\n  \"source\": {{ params.source }}\n}\n",
    )
    .unwrap();
    db.spec(&format!(
        r#"
[jobs.replay]
source.table = "sessions"
source.key = "id"
source.where = "kind = :kind"
params.kind = {{ type = "text", default = "run" }}
params.source = {{ type = "text", default = "backfill" }}
action.http.url = "{url}"
action.http.body = "templates/session.json.j2"
action.http.headers = {{ Authorization = "Bearer ${{WEBHOOK_TOKEN}}" }}
{extra}
"#
    ))
    .to_str()
    .unwrap()
    .to_string()
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_each_record_once_with_its_body_and_headers() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    sessions(&db, 400).await;
    let rx = Arc::new(Receiver::default());
    let url = serve(rx.clone()).await;
    let spec = spec(&db, &url, "concurrency = 8");

    let plan = db.run(&["plan", &spec, "--json"]);
    assert!(plan.status.success(), "{}", text(&plan));
    let plan_text = String::from_utf8_lossy(&plan.stdout).to_string();
    assert!(!plan_text.contains("s3cr3t-token-value"), "the plan masks secrets");
    let plan = json(&plan);
    assert_eq!(plan["jobs"][0]["candidates"], 200);
    let first = &plan["jobs"][0]["requests"][0];
    let body: serde_json::Value = serde_json::from_str(first["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"id": 2, "user": "user \"2\"", "score": 6, "source": "backfill"})
    );
    assert!(rx.got.lock().unwrap().is_empty(), "plan sends nothing");

    let out = db.run(&["run", &spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = json(&out);
    assert_eq!(summary["rows_changed"], 200, "{summary}");
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), 200, "each record once");
    let mut keys: Vec<&str> = got.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 200, "one Idempotency-Key per record");
    for r in &got {
        let id = r.body["id"].as_i64().unwrap();
        assert_eq!(id % 2, 0, "only the filtered rows");
        assert_eq!(r.body["user"], format!("user \"{id}\""));
        assert_eq!(r.body["score"], id * 3);
        assert_eq!(r.auth.as_deref(), Some("Bearer s3cr3t-token-value"));
        assert!(r.key.starts_with("infill-") && r.key.len() == 39, "{}", r.key);
    }
    // Secrets never reach the audit log.
    let log = std::fs::read_to_string(summary["audit_log"].as_str().unwrap()).unwrap();
    assert!(!log.contains("s3cr3t-token-value"));
    // State lives in the local SQLite file, not in the source database.
    assert!(db.path().join(".infill/state.db").exists());
    assert!(!db.table_exists("infill_runs").await);
    // Running again is a new replay: every record again, each with the
    // same Idempotency-Key, so the receiver can drop them.
    let again = db.run(&["run", &spec, "--json"]);
    assert!(again.status.success(), "{}", text(&again));
    let all = rx.got.lock().unwrap().clone();
    assert_eq!(all.len(), 400);
    let mut again_keys: Vec<&str> = all[200..].iter().map(|r| r.key.as_str()).collect();
    again_keys.sort();
    assert_eq!(again_keys, keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_503_with_retry_after_until_all_delivered() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    sessions(&db, 200).await;
    let rx = Arc::new(Receiver {
        flaky_every: Some(5),
        ..Receiver::default()
    });
    let url = serve(rx.clone()).await;
    let spec = spec(&db, &url, "concurrency = 16");
    let out = db.run(&["run", &spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(json(&out)["rows_changed"], 100);
    let got = rx.got.lock().unwrap().clone();
    let ok: Vec<&Received> = got.iter().filter(|r| r.status == 200).collect();
    assert_eq!(ok.len(), 100, "every record delivered once");
    let mut by_key: HashMap<&str, Vec<u16>> = HashMap::new();
    for r in &got {
        by_key.entry(&r.key).or_default().push(r.status);
    }
    let retried = by_key.values().filter(|s| s.as_slice() == [503, 200]).count();
    assert_eq!(retried, 20, "20% answered 503 first, then 200 with the same key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_goes_to_the_dead_letter() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    sessions(&db, 200).await;
    let rx = Arc::new(Receiver {
        reject_every: Some(25),
        ..Receiver::default()
    });
    let url = serve(rx.clone()).await;
    let spec = spec(&db, &url, "concurrency = 4\nmax_failures = 10");
    let out = db.run(&["run", &spec, "--json"]);
    assert_eq!(out.status.code(), Some(1), "records failed: {}", text(&out));
    let summary = json(&out);
    assert_eq!(summary["rows_changed"], 96, "{summary}");
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(
        got.iter().filter(|r| r.status == 400).count(),
        4,
        "a 400 is not retried"
    );
    let failures = db.run(&["failures", summary["run_id"].as_str().unwrap(), "--json"]);
    assert!(failures.status.success(), "{}", text(&failures));
    let failures = json(&failures);
    let keys: Vec<i64> = failures
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["key"][0].as_i64().unwrap())
        .collect();
    assert_eq!(keys, [50, 100, 150, 200], "{failures}");
    assert_eq!(failures[0]["error_code"], "400", "{failures}");
    assert!(
        failures[0]["message"]
            .as_str()
            .unwrap()
            .contains("invalid session payload"),
        "{failures}"
    );

    // The receiver is fixed: --retry-failed sends those four again, and
    // nothing else, with the keys they had.
    rx.fixed.store(true, Ordering::SeqCst);
    let failed_keys: Vec<String> = got.iter().filter(|r| r.status == 400).map(|r| r.key.clone()).collect();
    let before = got.len();
    let out = db.run(&[
        "run",
        &spec,
        "--retry-failed",
        summary["run_id"].as_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json(&out)["rows_changed"], 4, "{}", text(&out));
    let got = rx.got.lock().unwrap().clone();
    let resent: Vec<&Received> = got[before..].iter().collect();
    let mut ids: Vec<i64> = resent.iter().map(|r| r.body["id"].as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, [50, 100, 150, 200]);
    assert!(resent.iter().all(|r| r.status == 200 && failed_keys.contains(&r.key)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_replay_resends_at_most_the_in_flight() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    sessions(&db, 3000).await;
    let rx = Arc::new(Receiver {
        delay: Duration::from_millis(4),
        ..Receiver::default()
    });
    let url = serve(rx.clone()).await;
    let spec = spec(&db, &url, "concurrency = 8");
    let mut child = db.spawn(&["run", &spec]);
    let start = std::time::Instant::now();
    while rx.got.lock().unwrap().len() < 400 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        assert!(child.try_wait().unwrap().is_none(), "ended before it was killed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    let out = db.run(&["run", &spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let got = rx.got.lock().unwrap().clone();
    let mut by_id: HashMap<i64, Vec<&str>> = HashMap::new();
    for r in &got {
        by_id.entry(r.body["id"].as_i64().unwrap()).or_default().push(&r.key);
    }
    assert_eq!(by_id.len(), 1500, "every record received");
    let dups: Vec<_> = by_id.iter().filter(|(_, k)| k.len() > 1).collect();
    assert!(dups.len() <= 8, "at most `concurrency` sent again, got {}", dups.len());
    for (id, keys) in dups {
        assert!(
            keys.iter().all(|k| *k == keys[0]),
            "record {id} kept its Idempotency-Key"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_field_in_the_template_fails_at_plan() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    sessions(&db, 10).await;
    let spec = spec(&db, "http://127.0.0.1:9/hook", "");
    std::fs::write(
        db.path().join("templates/session.json.j2"),
        "{\n  \"id\": {{ row.id }},\n  \"x\": {{ row.nope }}\n}\n",
    )
    .unwrap();
    for args in [vec!["plan", spec.as_str()], vec!["run", spec.as_str(), "--dry-run"]] {
        let out = db.run(&args);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("templates/session.json.j2:3"),
            "names the template line: {err}"
        );
    }
}

/// A receiver that is down: each attempt fails to connect, the record is
/// dead-lettered after `max_attempts`, and with no failures allowed the run
/// stops (exit 1) naming the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_down_stops_the_run() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    sessions(&db, 10).await;
    let spec = spec(&db, "http://127.0.0.1:1/hook", "action.http.max_attempts = 2");
    let out = db.run(&["run", &spec, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let summary = json(&out);
    assert_eq!(summary["rows_changed"], 0, "{summary}");
    let failures = json(&db.run(&["failures", summary["run_id"].as_str().unwrap(), "--json"]));
    let message = failures[0]["message"].as_str().unwrap();
    assert!(message.starts_with("no response after 2 attempt(s)"), "{message}");
}

/// Seed 004 whole: sessions in an old PostgreSQL database that are missing
/// from the new one (SQLite here) are replayed as webhooks, exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_exactly_the_rows_a_diff_finds_missing() {
    let Some(old) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let Some(new) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    old.exec(
        "CREATE TABLE sessions (id BIGINT PRIMARY KEY, kind TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL);
         INSERT INTO sessions SELECT i, CASE WHEN i % 3 = 0 THEN 'run' ELSE 'walk' END,
           TIMESTAMPTZ '2025-03-01 00:00:00+00' + i * INTERVAL '1 hour' FROM generate_series(1, 300) i;",
    )
    .await;
    new.exec("CREATE TABLE sessions (id INTEGER PRIMARY KEY, kind TEXT NOT NULL)")
        .await;
    new.exec(&format!(
        "INSERT INTO sessions SELECT i, 'x' FROM ({}) s WHERE i % 10 <> 0",
        new.series(300)
    ))
    .await;
    let rx = Arc::new(Receiver::default());
    let url = serve(rx.clone()).await;
    let spec = new.spec(&format!(
        r#"old = "{}"

[jobs.replay]
source.diff = {{ from = "old", query = "SELECT id, kind, created_at FROM sessions WHERE kind = :kind", key = "id", missing_in = "sessions" }}
params.kind = {{ type = "text", default = "run" }}
action.http.url = "{url}"
action.http.body = '{{"id": {{{{ row.id }}}}, "kind": {{{{ row.kind }}}}, "at": {{{{ row.created_at }}}}}}'
concurrency = 4
"#,
        old.url
    ));
    let out = new.run(&["run", spec.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let got = rx.got.lock().unwrap().clone();
    let mut ids: Vec<i64> = got.iter().map(|r| r.body["id"].as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!(
        ids,
        (1..=10).map(|i| i * 30).collect::<Vec<i64>>(),
        "ids divisible by 10 and by 3"
    );
    assert_eq!(got[0].body["kind"], "run");
    assert!(
        got[0].body["at"].as_str().unwrap().starts_with("2025-03-"),
        "{:?}",
        got[0].body
    );
}
