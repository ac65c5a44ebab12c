//! Broken specs are refused before anything is written: exit code 2, an
//! error naming the spec file with `:LINE:COLUMN` and the dotted field, the
//! target table unchanged, no state table and no audit log. Mistakes only a
//! database can see (unknown table, column, key) are caught by preparing the
//! spec's SQL against the real target, on every engine.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Backend, TestDb, text};

const COLS: &[&str] = &["id", "grp", "note"];

/// The spec every case breaks in one place. It runs as is (see
/// `the_unbroken_spec_runs`), so each refusal is caused by the break alone.
const GOOD: &str = r#"
[jobs.fill]
source.table = "items"
source.key = "id"
source.where = "note IS NULL AND grp = :grp"
action.update.note = "'filled'"
params.grp = { type = "int", default = 1 }
"#;

/// `GOOD` with `from` replaced by `to` (which must occur exactly once).
fn broken(from: &str, to: &str) -> String {
    assert_eq!(GOOD.matches(from).count(), 1, "`{from}` must occur once in GOOD");
    GOOD.replace(from, to)
}

async fn sqlite() -> TestDb {
    TestDb::new(Backend::Sqlite).await.expect("SQLite needs no server")
}

/// The target table, 100 rows, a third of them candidates; returns its checksum.
async fn fixture(db: &TestDb) -> String {
    db.exec("CREATE TABLE items (id BIGINT NOT NULL PRIMARY KEY, grp INTEGER NOT NULL, note VARCHAR(40))")
        .await;
    db.exec(&format!(
        "INSERT INTO items (id, grp, note) SELECT i, i % 3, CASE WHEN i % 10 = 0 THEN 'kept' ELSE NULL END FROM ({}) s",
        db.series(100)
    ))
    .await;
    db.checksum("items", COLS, "id").await
}

/// Runs `cmd`, expects the refusal of a broken spec (exit 2, nothing on
/// stdout, nothing written anywhere) and returns stderr.
async fn refused_by(db: &TestDb, cmd: &mut Command, before: &str) -> String {
    let out = cmd.output().expect("infill runs");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", text(&out));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        db.checksum("items", COLS, "id").await,
        before,
        "the target table is unchanged"
    );
    assert!(!db.table_exists("infill_runs").await, "no state table was created");
    assert!(!db.path().join("infill_logs").exists(), "no audit log was written");
    stderr
}

/// `infill run SPEC ARGS`, refused.
async fn refused(db: &TestDb, spec: &Path, args: &[&str], before: &str) -> String {
    let mut cmd = db.infill();
    cmd.arg("run").arg(spec).args(args);
    refused_by(db, &mut cmd, before).await
}

/// What the first error line says, split: `error: FILE:LINE:COLUMN: FIELD: MESSAGE`.
#[derive(Debug)]
struct Pointed {
    line: usize,
    column: usize,
    field: String,
    message: String,
}

fn pointed(stderr: &str, spec: &Path) -> Pointed {
    let first = stderr.lines().next().unwrap_or_default();
    let prefix = format!("error: {}:", spec.display());
    let rest = first
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("the error does not start with `{prefix}`:\n{stderr}"));
    let (line, rest) = rest.split_once(':').unwrap_or_else(|| panic!("no line in {stderr}"));
    let (column, rest) = rest.split_once(": ").unwrap_or_else(|| panic!("no column in {stderr}"));
    let (field, message) = rest.split_once(": ").unwrap_or_else(|| panic!("no field in {stderr}"));
    Pointed {
        line: line.parse().unwrap_or_else(|_| panic!("line `{line}` in {stderr}")),
        column: column
            .parse()
            .unwrap_or_else(|_| panic!("column `{column}` in {stderr}")),
        field: field.to_string(),
        message: message.to_string(),
    }
}

/// Line and column (1-based) where `needle` starts in the written spec file;
/// `needle` must occur once.
fn position_of(spec: &Path, needle: &str) -> (usize, usize) {
    let text = std::fs::read_to_string(spec).unwrap();
    assert_eq!(
        text.matches(needle).count(),
        1,
        "`{needle}` must occur once in:\n{text}"
    );
    let offset = text.find(needle).unwrap();
    let before = &text[..offset];
    (
        before.matches('\n').count() + 1,
        before.rsplit('\n').next().unwrap().chars().count() + 1,
    )
}

impl Pointed {
    /// Asserts the error points at where `needle` starts and names `field`.
    fn at(&self, spec: &Path, needle: &str, field: &str) -> &Self {
        let (line, column) = position_of(spec, needle);
        assert_eq!(
            (self.line, self.column),
            (line, column),
            "points at `{}`: {self:?}",
            needle.escape_debug()
        );
        assert_eq!(self.field, field, "{self:?}");
        self
    }
    fn says(&self, words: &str) -> &Self {
        assert!(self.message.contains(words), "the message says `{words}`: {self:?}");
        self
    }
}

/// The error text with the test's temp folder replaced by `[DIR]`.
fn masked(db: &TestDb, stderr: &str) -> String {
    stderr.replace(&db.path().display().to_string(), "[DIR]")
}

async fn the_unbroken_spec_runs(db: TestDb) {
    fixture(&db).await;
    let want = db
        .int("SELECT COUNT(*) FROM items WHERE note IS NULL AND grp = 1")
        .await;
    assert!(want > 20, "{want}");
    let spec = db.spec(GOOD);
    let out = db.run(&["run", spec.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rows_changed"], want);
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE note = 'filled'").await, want);
    assert!(db.table_exists("infill_runs").await);
}
on_all_backends!(the_unbroken_spec_runs, the_unbroken_spec_runs);

// ---------------------------------------------------------------------------
// Mistakes in the file itself: caught before any connection (SQLite only).
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bad_toml_syntax() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    // The string of source.where is never closed.
    let spec = db.spec(&broken("grp = :grp\"", "grp = :grp"));
    let err = refused(&db, &spec, &[], &before).await;
    // Points at the end of the line where the string should have closed.
    pointed(&err, &spec)
        .at(&spec, "\naction.update.note", "jobs.fill.source.where")
        .says("invalid basic string");
    insta::assert_snapshot!("bad_toml_syntax", masked(&db, &err));
}

#[tokio::test]
async fn unknown_top_level_field() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&format!("{GOOD}\n[defaultz]\nbatch_size = 500\n"));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "defaultz]", "defaultz")
        .says("unknown field `defaultz`")
        .says("`defaults`");
    insta::assert_snapshot!("unknown_top_level_field", masked(&db, &err));
}

#[tokio::test]
async fn unknown_field_inside_a_job() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&broken("source.key", "source.kee"));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "kee", "jobs.fill.source.kee")
        .says("unknown field `kee`")
        .says("`key`");
    insta::assert_snapshot!("unknown_field_inside_a_job", masked(&db, &err));
}

#[tokio::test]
async fn missing_source_table() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&broken("source.table = \"items\"\n", ""));
    let err = refused(&db, &spec, &[], &before).await;
    // The `source` table starts at its first dotted key.
    pointed(&err, &spec)
        .at(&spec, "source.key", "jobs.fill.source.table")
        .says("missing");
}

#[tokio::test]
async fn missing_source_key() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&broken("source.key = \"id\"\n", ""));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "source.table", "jobs.fill.source.key")
        .says("missing");
}

#[tokio::test]
async fn missing_action() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&broken("action.update.note = \"'filled'\"\n", ""));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "[jobs.fill]", "jobs.fill.action")
        .says("missing")
        .says("action.update");
    insta::assert_snapshot!("missing_action", masked(&db, &err));
}

#[tokio::test]
async fn unknown_param_type() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&broken("type = \"int\"", "type = \"integer64\""));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "\"integer64\"", "jobs.fill.params.grp.type")
        .says("unknown type `integer64`");
}

#[tokio::test]
async fn bad_param_default() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&broken("default = 1", "default = \"one\""));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "\"one\"", "jobs.fill.params.grp.default")
        .says("`one` is not an int");
}

#[tokio::test]
async fn param_value_of_the_wrong_type() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(GOOD);
    let err = refused(&db, &spec, &["--param", "grp=seven"], &before).await;
    // A command-line mistake: no file position, but the param and the value are named.
    assert_eq!(err, "error: --param grp: `seven` is not an int\n");
}

#[tokio::test]
async fn param_not_declared_by_the_job() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(GOOD);
    let err = refused(&db, &spec, &["--param", "group=1"], &before).await;
    assert_eq!(err, "error: job `fill` has no param `group` (declared: grp)\n");
}

#[tokio::test]
async fn required_param_not_given() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&broken(
        "params.grp = { type = \"int\", default = 1 }",
        "params.grp = { type = \"int\" }",
    ));
    let err = refused(&db, &spec, &[], &before).await;
    assert!(err.contains("job `fill` needs --param grp=<int>"), "{err}");
    // It says where the param is declared.
    let (line, column) = position_of(&spec, "{ type = \"int\" }");
    assert!(
        err.contains(&format!("(declared at {}:{line}:{column})", spec.display())),
        "{err}"
    );
}

#[tokio::test]
async fn undeclared_param_in_where() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&broken("params.grp = { type = \"int\", default = 1 }\n", ""));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "\"note IS NULL", "jobs.fill.source.where")
        .says("uses :grp, which is not declared");
    insta::assert_snapshot!("undeclared_param_in_where", masked(&db, &err));
}

#[tokio::test]
async fn undefined_variable_in_the_database_url() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let var = "INFILL_TEST_SURELY_UNSET_DIR";
    let spec = db.spec_with_url(&format!("sqlite://${{{var}}}/target.db"), GOOD);
    let mut cmd = db.infill();
    cmd.env_remove(var).arg("run").arg(&spec);
    let err = refused_by(&db, &mut cmd, &before).await;
    pointed(&err, &spec)
        .at(&spec, "\"sqlite://", "databases.target")
        .says(&format!("${{{var}}} is not set"));
    insta::assert_snapshot!("undefined_variable_in_the_database_url", masked(&db, &err));
}

#[tokio::test]
async fn unknown_job() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(GOOD);
    let err = refused(&db, &spec, &["--job", "nope"], &before).await;
    // No position to point at: the job is not in the file. The file and its jobs are named.
    assert_eq!(
        err,
        format!("error: {}: no job named `nope` (jobs: fill)\n", spec.display())
    );
}

#[tokio::test]
async fn unknown_dependency() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&format!("{GOOD}depends_on = [\"ghost\"]\n"));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "\"ghost\"", "jobs.fill.depends_on")
        .says("unknown job `ghost`");
}

#[tokio::test]
async fn dependency_cycle() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(
        r#"
[jobs.a]
source.table = "items"
source.key = "id"
action.update.note = "'a'"
depends_on = ["b"]

[jobs.b]
source.table = "items"
source.key = "id"
action.update.note = "'b'"
depends_on = ["a"]
"#,
    );
    let err = refused(&db, &spec, &[], &before).await;
    // Points at the dependency that closes the cycle, in the job the message names.
    pointed(&err, &spec)
        .at(&spec, "\"b\"]", "jobs.a.depends_on")
        .says("dependency cycle: a -> b -> a");
    insta::assert_snapshot!("dependency_cycle", masked(&db, &err));
    // Running one job of the cycle is refused the same way.
    let again = refused(&db, &spec, &["--job", "b"], &before).await;
    assert_eq!(again, err);
}

#[tokio::test]
async fn key_column_in_action_update() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&format!("{GOOD}action.update.id = \"id + 1\"\n"));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "\"id + 1\"", "jobs.fill.action.update.id")
        .says("a key column cannot be updated");
}

#[tokio::test]
async fn bad_duration() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&format!("{GOOD}batch_time = \"fast\"\n"));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "\"fast\"", "jobs.fill.batch_time")
        .says("`fast` is not a duration");
}

#[tokio::test]
async fn bad_rate() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&format!("{GOOD}rate = \"lots\"\n"));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "\"lots\"", "jobs.fill.rate")
        .says("`lots` is not a rate");
    // The unit is checked too.
    let spec = db.spec(&format!("{GOOD}rate = \"500/fortnight\"\n"));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "\"500/fortnight\"", "jobs.fill.rate")
        .says("unknown unit `fortnight`");
}

#[tokio::test]
async fn bad_rate_on_the_command_line() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(GOOD);
    let err = refused(&db, &spec, &["--rate", "fast"], &before).await;
    assert_eq!(
        err,
        "error: --rate: `fast` is not a rate (write it as 500/s or 20/min)\n"
    );
}

#[tokio::test]
async fn bad_setting_in_defaults() {
    let db = sqlite().await;
    let before = fixture(&db).await;
    let spec = db.spec(&format!("\n[defaults]\nmin_batch = -5\n{GOOD}"));
    let err = refused(&db, &spec, &[], &before).await;
    pointed(&err, &spec)
        .at(&spec, "-5", "defaults.min_batch")
        .says("must be at least 1, not -5");
}

// ---------------------------------------------------------------------------
// Mistakes only the database can see: the spec's SQL is prepared against the
// target before anything is written.
// ---------------------------------------------------------------------------

/// The first line of an error from preparing `field` against the target.
fn does_not_prepare(err: &str, spec: &Path, needle: &str, field: &str) -> String {
    let p = pointed(err, spec);
    p.at(spec, needle, field)
        .says("does not prepare against database `target`: ");
    assert_eq!(err.lines().count(), 1, "one line, no stack trace: {err}");
    p.message
}

async fn unknown_table(db: TestDb) {
    let before = fixture(&db).await;
    let spec = db.spec(&broken("\"items\"", "\"itemz\""));
    let err = refused(&db, &spec, &[], &before).await;
    does_not_prepare(&err, &spec, "\"itemz\"", "jobs.fill.source.table");
    let (line, column) = position_of(&spec, "\"itemz\"");
    assert_eq!(
        err,
        format!(
            "error: {}:{line}:{column}: jobs.fill.source.table: does not prepare against database `target`: table `itemz` does not exist\n",
            spec.display()
        )
    );
    // A dry run is refused the same way.
    assert_eq!(refused(&db, &spec, &["--dry-run"], &before).await, err);
}
on_all_backends!(unknown_table, unknown_table);

async fn unknown_column_in_where(db: TestDb) {
    let before = fixture(&db).await;
    let spec = db.spec(&broken("grp = :grp", "grpp = :grp"));
    let err = refused(&db, &spec, &[], &before).await;
    let message = does_not_prepare(&err, &spec, "\"note IS NULL AND grpp", "jobs.fill.source.where");
    // The server's own words, naming the column.
    assert!(message.contains("grpp"), "{message}");
    assert!(message.to_lowercase().contains("column"), "{message}");
}
on_all_backends!(unknown_column_in_where, unknown_column_in_where);

async fn unknown_column_in_update_expression(db: TestDb) {
    let before = fixture(&db).await;
    let spec = db.spec(&broken("\"'filled'\"", "\"nosuch || 'x'\""));
    let err = refused(&db, &spec, &[], &before).await;
    let message = does_not_prepare(&err, &spec, "\"nosuch", "jobs.fill.action.update.note");
    assert!(message.contains("nosuch"), "{message}");
    assert!(message.to_lowercase().contains("column"), "{message}");
}
on_all_backends!(unknown_column_in_update_expression, unknown_column_in_update_expression);

async fn unknown_column_set(db: TestDb) {
    let before = fixture(&db).await;
    let spec = db.spec(&broken("action.update.note", "action.update.notes"));
    let err = refused(&db, &spec, &[], &before).await;
    let message = does_not_prepare(&err, &spec, "\"'filled'\"", "jobs.fill.action.update.notes");
    assert_eq!(
        message,
        "does not prepare against database `target`: column `notes` does not exist in table `items`"
    );
}
on_all_backends!(unknown_column_set, unknown_column_set);

async fn column_differing_in_case(db: TestDb) {
    let before = fixture(&db).await;
    let spec = db.spec(&broken("action.update.note", "action.update.NOTE"));
    if db.backend == Backend::Postgres {
        // Quoted identifiers are case-sensitive on PostgreSQL: refused, with a hint.
        let err = refused(&db, &spec, &[], &before).await;
        let message = does_not_prepare(&err, &spec, "\"'filled'\"", "jobs.fill.action.update.NOTE");
        assert_eq!(
            message,
            "does not prepare against database `target`: column `NOTE` does not exist in table `items` (did you mean `note`?)"
        );
    } else {
        // SQLite and MariaDB match column names case-insensitively: it runs.
        let out = db.run(&["run", spec.to_str().unwrap(), "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let want = db
            .int("SELECT COUNT(*) FROM items WHERE grp = 1 AND (note IS NULL OR note = 'filled')")
            .await;
        assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE note = 'filled'").await, want);
    }
}
on_all_backends!(column_differing_in_case, column_differing_in_case);

async fn unknown_key_column(db: TestDb) {
    let before = fixture(&db).await;
    let spec = db.spec(&broken("source.key = \"id\"", "source.key = \"idd\""));
    let err = refused(&db, &spec, &[], &before).await;
    let message = does_not_prepare(&err, &spec, "\"idd\"", "jobs.fill.source.key");
    assert_eq!(
        message,
        "does not prepare against database `target`: column `idd` does not exist in table `items`"
    );
}
on_all_backends!(unknown_key_column, unknown_key_column);
