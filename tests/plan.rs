//! `infill plan` is a read-only analysis: it writes nothing and creates no
//! table, reports an unknown column naming the spec field, and its counts
//! (candidates, categories, priority segments) and sample match the data.
//! `infill approve` and the gate: a run where approval is required refuses
//! (exit 3, saying why) without a matching approval, after a change of the
//! spec, of the params or of the candidate count beyond the drift, after
//! the approval expired, or when the approver runs it.

mod common;

use common::{TestDb, text};

const SPEC: &str = r#"
[defaults]
batch_size = 100

[jobs.fill]
source.table = "orders"
source.key = "id"
source.where = "total IS NULL AND id >= :from"
action.update.total = "qty * price"
params.from = { type = "int", default = 1 }
categories.small = "qty < 5"
categories.big = "qty >= 8"
categories.odd = "id % 2 = 1"
priority = ["qty = 9"]

[[jobs.fill.checks]]
name = "no order without a total"
sql = "SELECT COUNT(*) FROM orders WHERE total IS NULL"
expect = 0
"#;

async fn schema(db: &TestDb) {
    db.exec("CREATE TABLE orders (id BIGINT NOT NULL PRIMARY KEY, qty INT NOT NULL, price INT NOT NULL, total BIGINT)")
        .await;
    db.exec(&format!(
        "INSERT INTO orders (id, qty, price, total) SELECT i, i % 10, 3, CASE WHEN i % 3 = 0 THEN 0 ELSE NULL END FROM ({}) s",
        db.series(1000)
    ))
    .await;
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

async fn plan_reads_and_writes_nothing(db: TestDb) {
    schema(&db).await;
    let spec = db.spec(SPEC);
    let spec = spec.to_str().unwrap();
    let before = db.checksum("orders", &["id", "qty", "price", "total"], "id").await;

    let out = db.run(&["plan", spec, "--json", "--out", "plan.json"]);
    let plan = json(&out);
    assert_eq!(
        plan,
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(db.path().join("plan.json")).unwrap())
            .unwrap(),
        "--out writes what --json prints"
    );
    let job = &plan["jobs"][0];
    let db = &db;
    let count = |cond: &str| {
        let sql = format!("SELECT COUNT(*) FROM orders WHERE total IS NULL AND ({cond})");
        async move { db.int(&sql).await as u64 }
    };
    let candidates = count("1 = 1").await;
    assert_eq!(job["candidates"], candidates);
    assert_eq!(job["counted"], "exact");
    assert_eq!(job["keys_in_range"], 1000);
    // The rest while the application is at work, where the engine can see
    // other sessions (not SQLite's).
    let rest = match db.backend {
        common::Backend::Sqlite => serde_json::Value::Null,
        _ => serde_json::json!(2.0),
    };
    assert_eq!(job["busy_rest"], rest, "{job}");
    let cats: Vec<(String, u64)> = job["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c["rows"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        cats,
        vec![
            ("big".to_string(), count("qty >= 8").await),
            ("odd".to_string(), count("id % 2 = 1").await),
            ("small".to_string(), count("qty < 5").await),
        ],
        "categories in name order, each counted on its own (they overlap)"
    );
    assert_eq!(
        job["uncategorised"],
        count("NOT (qty < 5) AND NOT (qty >= 8) AND NOT (id % 2 = 1)").await
    );
    assert_eq!(job["priority"][0]["rows"], count("qty = 9").await);
    // The sample: the first candidates, with the value the update would write.
    let sample = job["sample"].as_array().unwrap();
    assert_eq!(sample.len(), 10);
    for row in sample {
        // Values travel as the server's text on PostgreSQL and MySQL.
        let int = |v: &serde_json::Value| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
        let id = int(&row["key"][0]).unwrap();
        assert_ne!(id % 3, 0, "only candidates are sampled");
        assert_eq!(row["before"][0][1], serde_json::Value::Null);
        assert_eq!(int(&row["after"][0][1]), Some((id % 10) * 3), "row {id}: {row}");
    }
    let writes: Vec<(&str, u64)> = job["writes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["table"].as_str().unwrap(), w["rows"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        writes,
        vec![
            ("orders", candidates),
            ("infill_undo", candidates),
            ("infill_batches", 20)
        ],
        "two segments (the priority one, then the rest) of 10 batches of 100 keys"
    );
    assert_eq!(job["checks"][0]["name"], "no order without a total");
    assert_eq!(job["fingerprint"]["sha256"].as_str().unwrap().len(), 64);

    // The human report says the same.
    let out = db.run(&["plan", spec]);
    assert!(out.status.success(), "{}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("Read-only: nothing was written"), "{report}");
    assert!(report.contains(&format!("candidates  {candidates}")), "{report}");
    assert!(report.contains("(in none)"), "{report}");

    // Nothing written, nothing created.
    assert_eq!(
        db.checksum("orders", &["id", "qty", "price", "total"], "id").await,
        before
    );
    for t in [
        "infill_runs",
        "infill_batches",
        "infill_undo",
        "infill_approvals",
        "infill_schema",
    ] {
        assert!(!db.table_exists(t).await, "plan created {t}");
    }

    // The same plan twice has the same fingerprint; another param value does not.
    let again = json(&db.run(&["plan", spec, "--json"]));
    assert_eq!(again["fingerprint"], plan["fingerprint"]);
    let other = json(&db.run(&["plan", spec, "--json", "--param", "from=2"]));
    assert_ne!(other["fingerprint"], plan["fingerprint"]);
    assert_eq!(
        other["jobs"][0]["fingerprint"]["definition_sha256"],
        job["fingerprint"]["definition_sha256"]
    );
}
on_all_backends!(plan_reads_and_writes_nothing, plan_reads_and_writes_nothing);

async fn plan_reports_unknown_columns_by_field(db: TestDb) {
    schema(&db).await;
    for (from, to, field) in [
        (
            "categories.big = \"qty >= 8\"",
            "categories.big = \"qtty >= 8\"",
            "jobs.fill.categories.big",
        ),
        (
            "WHERE total IS NULL\"\nexpect",
            "WHERE totl IS NULL\"\nexpect",
            "jobs.fill.checks[0].sql",
        ),
        (
            "priority = [\"qty = 9\"]",
            "priority = [\"qty = nine\"]",
            "jobs.fill.priority[0]",
        ),
    ] {
        assert!(SPEC.contains(from), "{from}");
        let spec = db.spec(&SPEC.replace(from, to));
        let out = db.run(&["plan", spec.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{field} named: {err}");
        assert!(err.contains("infill.toml:"), "file and line named: {err}");
    }
}
on_all_backends!(
    plan_reports_unknown_columns_by_field,
    plan_reports_unknown_columns_by_field
);

/// Where approval is required, each way a run can fail the gate, then the
/// ways it passes.
async fn the_gate(db: TestDb) {
    schema(&db).await;
    let gated = SPEC.replace(
        "[defaults]\n",
        "[defaults]\nrequire_approval = true\ndrift = 5\napprover_must_differ = true\n",
    );
    let spec_path = db.spec(&gated);
    let spec = spec_path.to_str().unwrap();
    let as_user = |user: &str, args: &[&str]| {
        let out = db.infill().env("USER", user).args(args).output().unwrap();
        (out.status.code(), text(&out))
    };
    let refused = |args: &[&str], why: &str| {
        let (code, out) = as_user("bob", args);
        assert_eq!(code, Some(3), "{args:?} must be refused: {out}");
        assert!(out.contains(why), "{args:?}: expected `{why}` in {out}");
    };

    // No approval at all; a dry run is not gated.
    refused(&["run", spec], "holds no approval");
    assert_eq!(as_user("bob", &["run", spec, "--dry-run"]).0, Some(0));

    let (code, out) = as_user("bob", &["plan", spec, "--out", "plan.json"]);
    assert_eq!(code, Some(0), "{out}");
    // alice approves (as herself: the OS user counts as the approver too).
    let (code, out) = as_user(
        "alice",
        &["approve", "plan.json", "--by", "alice", "--note", "counts checked"],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("approved by alice"), "{out}");
    assert_eq!(db.int("SELECT COUNT(*) FROM infill_approvals").await, 1);
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_runs").await,
        0,
        "approve runs nothing"
    );

    // Other params than approved.
    refused(
        &["run", spec, "--param", "from=2"],
        "the params differ (approved from=1, now from=2)",
    );
    // The approver may not run it.
    let (code, out) = as_user("alice", &["run", spec]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("approver_must_differ"), "{out}");
    // A changed spec.
    std::fs::write(
        &spec_path,
        std::fs::read_to_string(&spec_path)
            .unwrap()
            .replace("qty * price", "qty * price + 0"),
    )
    .unwrap();
    refused(&["run", spec], "the job's definition changed since");
    // Approving the old plan against the changed spec is refused too.
    refused(&["approve", "plan.json", "--by", "alice"], "changed");
    std::fs::write(
        &spec_path,
        std::fs::read_to_string(&spec_path)
            .unwrap()
            .replace("qty * price + 0", "qty * price"),
    )
    .unwrap();

    // Drift: 6 more candidates is beyond 5 rows; 3 more is within.
    db.exec("UPDATE orders SET total = NULL WHERE id IN (3, 6, 9, 12, 15, 18)")
        .await;
    refused(&["run", spec], "drifted: ");
    db.exec("UPDATE orders SET total = 0 WHERE id IN (3, 6, 9)").await;

    // An expired approval.
    let expiring = gated.replace("drift = 5\n", "drift = 5\napproval_ttl = \"1h\"\n");
    db.spec(&expiring);
    db.exec("UPDATE infill_approvals SET approved_at = '2020-01-01T00:00:00.000000Z'")
        .await;
    refused(&["run", spec], "has expired");
    db.spec(&gated);

    // --plan names a plan that nobody approved.
    let (code, out) = as_user("bob", &["plan", spec, "--out", "other.json", "--param", "from=2"]);
    assert_eq!(code, Some(0), "{out}");
    refused(
        &["run", spec, "--plan", "other.json", "--param", "from=2"],
        "has not been approved",
    );

    // Within the drift, by someone else than the approver: it runs.
    let (code, out) = as_user("bob", &["run", spec, "--plan", "plan.json"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(db.int("SELECT COUNT(*) FROM orders WHERE total IS NULL").await, 0);
    // The audit log names the approval that let the run through.
    let approval = db.texts("SELECT id FROM infill_approvals").await[0][0].clone();
    let start = &db.audit(None)[0];
    assert_eq!(start["event"], "run_start");
    assert_eq!(start["approval"].as_str(), approval.as_deref());
}
on_all_backends!(the_gate, the_gate);

/// `--estimate` takes the planner's estimate where the engine has one.
async fn estimates(db: TestDb) {
    schema(&db).await;
    db.exec(db.pick("ANALYZE", "ANALYZE orders", "ANALYZE TABLE orders"))
        .await;
    let spec = db.spec(SPEC);
    let plan = json(&db.run(&["plan", spec.to_str().unwrap(), "--json", "--estimate"]));
    let job = &plan["jobs"][0];
    let exact = db.int("SELECT COUNT(*) FROM orders WHERE total IS NULL").await as f64;
    match db.backend {
        common::Backend::Sqlite => {
            assert_eq!(job["counted"], "exact", "SQLite has no estimate: it counts");
            assert_eq!(job["candidates"].as_f64().unwrap(), exact);
        }
        _ => {
            assert_eq!(job["counted"], "estimate");
            let est = job["candidates"].as_f64().unwrap();
            assert!(
                est > 0.0 && est <= 1000.0,
                "an estimate within the table: {est} (exact {exact})"
            );
            assert_eq!(job["categories"].as_array().unwrap().len(), 3);
        }
    }
}
on_all_backends!(estimates, estimates);
