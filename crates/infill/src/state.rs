//! The state tables (`infill_runs`, `infill_batches`, `infill_undo`) live in
//! the target database, so a batch's write, its undo images and its
//! checkpoint commit in one transaction. The statements here are written
//! once for all three engines (see `dialect::portable`); only the DDL is
//! per dialect. `infill_schema` holds the version, so later releases can
//! migrate the tables in place.

use serde::Serialize;

use crate::dialect::{Db, Exec};
use crate::error::{Error, Result};
use crate::value::{Key, Value, key_from_json, key_to_json};

/// The state tables' current version.
pub const SCHEMA_VERSION: i64 = 3;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Paused,
    Interrupted,
    CanaryPassed,
    CanaryFailed,
    Succeeded,
    Failed,
    Cancelled,
    Undone,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Paused => "paused",
            RunStatus::Interrupted => "interrupted",
            RunStatus::CanaryPassed => "canary_passed",
            RunStatus::CanaryFailed => "canary_failed",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Undone => "undone",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        [
            RunStatus::Running,
            RunStatus::Paused,
            RunStatus::Interrupted,
            RunStatus::CanaryPassed,
            RunStatus::CanaryFailed,
            RunStatus::Succeeded,
            RunStatus::Failed,
            RunStatus::Cancelled,
            RunStatus::Undone,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// True while the run can still be continued.
    pub fn is_unfinished(self) -> bool {
        matches!(
            self,
            RunStatus::Running
                | RunStatus::Paused
                | RunStatus::Interrupted
                | RunStatus::CanaryPassed
                | RunStatus::CanaryFailed
        )
    }
}

/// One row of `infill_runs`.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub id: String,
    pub job: String,
    pub status: RunStatus,
    pub definition_sha256: String,
    pub spec_sha256: String,
    pub params: serde_json::Value,
    pub params_sha256: String,
    pub env: Option<String>,
    pub undo_enabled: bool,
    pub cursor: Option<Key>,
    pub upper: Option<Key>,
    /// The priority segment the cursor is in (0 without priority).
    pub segment: u64,
    pub batch_size: u64,
    pub batches: u64,
    pub rows_read: u64,
    pub rows_changed: u64,
    pub rows_skipped: u64,
    pub rows_failed: u64,
    pub host: String,
    pub pid: u32,
    pub os_user: String,
    pub started_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    pub message: Option<String>,
    /// The run group (`infill run SPEC` over several jobs) it belongs to.
    pub group_id: Option<String>,
    /// For an undo run: the run it undoes.
    pub undo_of: Option<String>,
}

const RUN_COLUMNS: &str = "id, job, status, definition_sha256, spec_sha256, params, params_sha256, env, \
    undo_enabled, cursor_key, upper_key, batch_size, batches, rows_read, rows_changed, rows_skipped, \
    rows_failed, host, pid, os_user, started_at, updated_at, finished_at, message, segment, group_id, undo_of";

/// Current time in the form state tables and logs use (UTC, microseconds).
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn key_text(k: &Option<Key>) -> Value {
    match k {
        Some(k) => Value::Text(key_to_json(k).to_string()),
        None => Value::Null,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        Value::Null => String::new(),
        other => other.display(),
    }
}

fn opt_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        v => Some(text(v)),
    }
}

fn int(v: &Value) -> u64 {
    match v {
        Value::Int(i) => *i as u64,
        Value::Text(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

fn parse_key(v: &Value) -> Option<Key> {
    opt_text(v)
        .and_then(|s| serde_json::from_str(&s).ok())
        .and_then(|j| key_from_json(&j))
}

impl RunRecord {
    fn from_row(r: &[Value]) -> Result<RunRecord> {
        let status = text(&r[2]);
        Ok(RunRecord {
            id: text(&r[0]),
            job: text(&r[1]),
            status: RunStatus::parse(&status)
                .ok_or_else(|| Error::CannotProceed(format!("run {} has an unknown status `{status}`", text(&r[0]))))?,
            definition_sha256: text(&r[3]),
            spec_sha256: text(&r[4]),
            params: serde_json::from_str(&text(&r[5])).unwrap_or(serde_json::Value::Null),
            params_sha256: text(&r[6]),
            env: opt_text(&r[7]),
            undo_enabled: int(&r[8]) != 0,
            cursor: parse_key(&r[9]),
            upper: parse_key(&r[10]),
            batch_size: int(&r[11]),
            batches: int(&r[12]),
            rows_read: int(&r[13]),
            rows_changed: int(&r[14]),
            rows_skipped: int(&r[15]),
            rows_failed: int(&r[16]),
            host: text(&r[17]),
            pid: int(&r[18]) as u32,
            os_user: text(&r[19]),
            started_at: text(&r[20]),
            updated_at: text(&r[21]),
            finished_at: opt_text(&r[22]),
            message: opt_text(&r[23]),
            segment: int(&r[24]),
            group_id: opt_text(&r[25]),
            undo_of: opt_text(&r[26]),
        })
    }

    /// A new run, started now by this process: no cursor, counters at 0.
    pub fn started(
        id: String,
        job: &str,
        definition_sha256: &str,
        spec_sha256: &str,
        params: serde_json::Value,
        params_sha256: String,
    ) -> RunRecord {
        let now = now();
        RunRecord {
            id,
            job: job.to_string(),
            status: RunStatus::Running,
            definition_sha256: definition_sha256.to_string(),
            spec_sha256: spec_sha256.to_string(),
            params,
            params_sha256,
            env: None,
            undo_enabled: false,
            cursor: None,
            upper: None,
            segment: 0,
            batch_size: 0,
            batches: 0,
            rows_read: 0,
            rows_changed: 0,
            rows_skipped: 0,
            rows_failed: 0,
            host: crate::host::hostname(),
            pid: std::process::id(),
            os_user: crate::host::os_user(),
            started_at: now.clone(),
            updated_at: now,
            finished_at: None,
            message: None,
            group_id: None,
            undo_of: None,
        }
    }

    /// True when the process that ran it is known to be gone (same host, pid dead).
    pub fn process_gone(&self) -> bool {
        self.host == crate::host::hostname() && !crate::host::pid_alive(self.pid)
    }
}

/// Creates the state tables when missing and records the schema version.
pub async fn ensure_schema(db: &Db, c: &mut impl Exec) -> Result<()> {
    for ddl in db.dialect.state_schema() {
        c.execute(&db.q(ddl, vec![]))
            .await
            .map_err(Error::db("cannot create infill's state tables"))?;
    }
    let rows = c
        .fetch(&db.q("SELECT MAX(version) FROM infill_schema", vec![]))
        .await
        .map_err(Error::db("cannot read infill_schema"))?;
    match rows.first().and_then(|r| r.first()) {
        Some(Value::Int(v)) if *v > SCHEMA_VERSION => Err(Error::CannotProceed(format!(
            "the state tables have schema version {v}, newer than this infill knows ({SCHEMA_VERSION}); upgrade infill"
        ))),
        Some(Value::Int(v)) if *v < SCHEMA_VERSION => {
            // Version 2 adds run groups and undo runs; version 3 widens
            // MySQL's undo keys for batches imaged by the engine.
            let mut steps: Vec<&str> = Vec::new();
            if *v < 2 {
                steps.extend([
                    "ALTER TABLE infill_runs ADD COLUMN group_id VARCHAR(36)",
                    "ALTER TABLE infill_runs ADD COLUMN undo_of VARCHAR(36)",
                ]);
            }
            steps.extend(db.dialect.schema_v3());
            steps.push("UPDATE infill_schema SET version = 3");
            for stmt in steps {
                c.execute(&db.q(stmt, vec![]))
                    .await
                    .map_err(Error::db("cannot migrate infill's state tables to version 3"))?;
            }
            Ok(())
        }
        Some(Value::Int(_)) => Ok(()),
        _ => {
            for tuning in db.dialect.state_tuning() {
                if let Err(e) = c.execute(&db.q(tuning, vec![])).await {
                    tracing::debug!("state table setting skipped: {e}");
                }
            }
            c.execute(&db.q(
                "INSERT INTO infill_schema (version) VALUES (?)",
                vec![Value::Int(SCHEMA_VERSION)],
            ))
            .await
            .map_err(Error::db("cannot write infill_schema"))?;
            Ok(())
        }
    }
}

/// True when the state tables exist (read commands must not create them).
pub async fn exists(db: &Db, c: &mut impl Exec) -> bool {
    c.fetch(&db.q("SELECT COUNT(*) FROM infill_runs WHERE 1 = 0", vec![]))
        .await
        .is_ok()
}

/// Records a new run.
pub async fn insert_run(db: &Db, c: &mut impl Exec, r: &RunRecord) -> Result<()> {
    let q = db.q(
        &format!("INSERT INTO infill_runs ({RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
        vec![
            Value::Text(r.id.clone()),
            Value::Text(r.job.clone()),
            Value::Text(r.status.as_str().into()),
            Value::Text(r.definition_sha256.clone()),
            Value::Text(r.spec_sha256.clone()),
            Value::Text(r.params.to_string()),
            Value::Text(r.params_sha256.clone()),
            r.env.clone().map(Value::Text).unwrap_or(Value::Null),
            Value::Int(r.undo_enabled as i64),
            key_text(&r.cursor),
            key_text(&r.upper),
            Value::Int(r.batch_size as i64),
            Value::Int(r.batches as i64),
            Value::Int(r.rows_read as i64),
            Value::Int(r.rows_changed as i64),
            Value::Int(r.rows_skipped as i64),
            Value::Int(r.rows_failed as i64),
            Value::Text(r.host.clone()),
            Value::Int(r.pid as i64),
            Value::Text(r.os_user.clone()),
            Value::Text(r.started_at.clone()),
            Value::Text(r.updated_at.clone()),
            r.finished_at.clone().map(Value::Text).unwrap_or(Value::Null),
            r.message.clone().map(Value::Text).unwrap_or(Value::Null),
            Value::Int(r.segment as i64),
            r.group_id.clone().map(Value::Text).unwrap_or(Value::Null),
            r.undo_of.clone().map(Value::Text).unwrap_or(Value::Null),
        ],
    );
    c.execute(&q)
        .await
        .map_err(Error::db("cannot record the run in infill_runs"))?;
    Ok(())
}

/// The newest unfinished run of a job with these params, if any.
pub async fn find_unfinished(db: &Db, c: &mut impl Exec, job: &str, params_sha256: &str) -> Result<Option<RunRecord>> {
    let rows = c
        .fetch(&db.q(
            &format!(
                "SELECT {RUN_COLUMNS} FROM infill_runs WHERE job = ? AND params_sha256 = ? \
                 AND status IN ('running', 'paused', 'interrupted', 'canary_passed', 'canary_failed') ORDER BY id DESC"
            ),
            vec![Value::Text(job.into()), Value::Text(params_sha256.into())],
        ))
        .await
        .map_err(Error::db("cannot read infill_runs"))?;
    rows.first().map(|r| RunRecord::from_row(r)).transpose()
}

/// The run whose id starts with `prefix` (8 characters or more).
pub async fn find_run(db: &Db, c: &mut impl Exec, prefix: &str) -> Result<RunRecord> {
    if prefix.len() < 8 || !prefix.chars().all(|ch| ch.is_ascii_hexdigit() || ch == '-') {
        return Err(Error::Usage(format!(
            "`{prefix}` is not a run id: give the id or a prefix of 8 or more characters"
        )));
    }
    if !exists(db, c).await {
        return Err(Error::RunNotFound(format!(
            "no run {prefix}: database `{}` has no infill state yet",
            db.name
        )));
    }
    let rows = c
        .fetch(&db.q(
            &format!("SELECT {RUN_COLUMNS} FROM infill_runs WHERE id LIKE ? ORDER BY id"),
            vec![Value::Text(format!("{}%", prefix.to_ascii_lowercase()))],
        ))
        .await
        .map_err(Error::db("cannot read infill_runs"))?;
    match rows.len() {
        0 => Err(Error::RunNotFound(format!("no run {prefix} in database `{}`", db.name))),
        1 => RunRecord::from_row(&rows[0]),
        n => Err(Error::Usage(format!(
            "{n} runs start with {prefix}; give more characters"
        ))),
    }
}

/// The runs of a group (by id or a prefix of 8+ characters), oldest first.
pub async fn find_group(db: &Db, c: &mut impl Exec, prefix: &str) -> Result<Vec<RunRecord>> {
    if prefix.len() < 8 || !exists(db, c).await {
        return Ok(Vec::new());
    }
    let rows = c
        .fetch(&db.q(
            &format!("SELECT {RUN_COLUMNS} FROM infill_runs WHERE group_id LIKE ? ORDER BY id"),
            vec![Value::Text(format!("{}%", prefix.to_ascii_lowercase()))],
        ))
        .await
        .map_err(Error::db("cannot read infill_runs"))?;
    let runs = rows
        .iter()
        .map(|r| RunRecord::from_row(r))
        .collect::<Result<Vec<_>>>()?;
    if let Some(other) = runs.iter().find(|r| r.group_id != runs[0].group_id) {
        return Err(Error::Usage(format!(
            "several run groups start with {prefix} ({} and {}); give more characters",
            runs[0].group_id.as_deref().unwrap_or_default(),
            other.group_id.as_deref().unwrap_or_default()
        )));
    }
    Ok(runs)
}

/// The undo runs of a run, newest first.
pub async fn list_undo_runs(db: &Db, c: &mut impl Exec, of: &str) -> Result<Vec<RunRecord>> {
    let rows = c
        .fetch(&db.q(
            &format!("SELECT {RUN_COLUMNS} FROM infill_runs WHERE undo_of = ? ORDER BY id DESC"),
            vec![Value::Text(of.into())],
        ))
        .await
        .map_err(Error::db("cannot read infill_runs"))?;
    rows.iter().map(|r| RunRecord::from_row(r)).collect()
}

/// The ids of a job's runs, oldest first.
pub async fn run_ids_of_job(db: &Db, c: &mut impl Exec, job: &str) -> Result<Vec<String>> {
    let rows = c
        .fetch(&db.q(
            "SELECT id FROM infill_runs WHERE job = ? ORDER BY id",
            vec![Value::Text(job.into())],
        ))
        .await
        .map_err(Error::db("cannot read infill_runs"))?;
    Ok(rows
        .iter()
        .filter_map(|r| match r.first() {
            Some(Value::Text(id)) => Some(id.clone()),
            _ => None,
        })
        .collect())
}

/// The most recent runs, newest first.
pub async fn list_runs(db: &Db, c: &mut impl Exec, limit: u32) -> Result<Vec<RunRecord>> {
    if !exists(db, c).await {
        return Ok(Vec::new());
    }
    let rows = c
        .fetch(&db.q(
            &format!("SELECT {RUN_COLUMNS} FROM infill_runs ORDER BY id DESC LIMIT {limit}"),
            vec![],
        ))
        .await
        .map_err(Error::db("cannot read infill_runs"))?;
    rows.iter().map(|r| RunRecord::from_row(r)).collect()
}

/// Sets a run's status (and message), marking it finished when final.
pub async fn set_status(db: &Db, c: &mut impl Exec, id: &str, status: RunStatus, message: Option<&str>) -> Result<()> {
    let now = now();
    let finished = if status.is_unfinished() {
        Value::Null
    } else {
        Value::Text(now.clone())
    };
    c.execute(&db.q(
        "UPDATE infill_runs SET status = ?, message = ?, updated_at = ?, finished_at = ? WHERE id = ?",
        vec![
            Value::Text(status.as_str().into()),
            message.map(|m| Value::Text(m.into())).unwrap_or(Value::Null),
            Value::Text(now),
            finished,
            Value::Text(id.into()),
        ],
    ))
    .await
    .map_err(Error::db("cannot update the run's status in infill_runs"))?;
    Ok(())
}

/// Requests to a live run, kept in `infill_runs.control` as JSON and read
/// by the run between batches: `infill pause`, `resume`, `cancel`, `set`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Control {
    #[serde(default)]
    pub pause: bool,
    #[serde(default)]
    pub cancel: bool,
    /// `infill set RUN key=value`: settings that override the spec's.
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
    /// `--rate`, `--batch-size`, `--concurrency` given to the `infill run`
    /// that started or last continued the run, as `set` pairs: `infill
    /// resume` keeps them, `infill run` replaces them with its own.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub command_line: std::collections::BTreeMap<String, String>,
}

impl Control {
    /// The settings the run goes on with over the spec's: the command
    /// line's, then `infill set`'s (the later word).
    pub fn settings(&self) -> std::collections::BTreeMap<String, String> {
        let mut m = self.command_line.clone();
        m.extend(self.set.clone());
        m
    }
}

/// A run's control requests (none when unset or unreadable).
pub async fn read_control(db: &Db, c: &mut impl Exec, id: &str) -> Result<Control> {
    let rows = c
        .fetch(&db.q(
            "SELECT control FROM infill_runs WHERE id = ?",
            vec![Value::Text(id.into())],
        ))
        .await
        .map_err(Error::db("cannot read the run's control requests"))?;
    Ok(rows
        .first()
        .and_then(|r| opt_text(&r[0]))
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default())
}

/// Replaces a run's control requests.
pub async fn write_control(db: &Db, c: &mut impl Exec, id: &str, control: &Control) -> Result<()> {
    c.execute(&db.q(
        "UPDATE infill_runs SET control = ? WHERE id = ?",
        vec![
            Value::Text(serde_json::to_string(control).expect("serialisable")),
            Value::Text(id.into()),
        ],
    ))
    .await
    .map_err(Error::db("cannot write the run's control requests"))?;
    Ok(())
}

/// Marks a run as continued by this process.
pub async fn claim(db: &Db, c: &mut impl Exec, id: &str, spec_sha256: &str) -> Result<()> {
    c.execute(&db.q(
        "UPDATE infill_runs SET status = ?, host = ?, pid = ?, spec_sha256 = ?, updated_at = ?, message = ? WHERE id = ?",
        vec![
            Value::Text(RunStatus::Running.as_str().into()),
            Value::Text(crate::host::hostname()),
            Value::Int(std::process::id() as i64),
            Value::Text(spec_sha256.into()),
            Value::Text(now()),
            Value::Null,
            Value::Text(id.into()),
        ],
    ))
    .await
    .map_err(Error::db("cannot claim the run in infill_runs"))?;
    Ok(())
}

/// One committed batch, as the checkpoint records it.
#[derive(Debug, Clone, Serialize)]
pub struct Checkpoint {
    pub batch_no: u64,
    pub lower: Option<Key>,
    pub upper: Key,
    pub rows_read: u64,
    pub rows_changed: u64,
    pub rows_skipped: u64,
    pub rows_failed: u64,
    pub batch_size: u64,
    pub duration_ms: u64,
    /// The priority segment the batch belongs to (0 without priority).
    pub segment: u64,
}

impl Checkpoint {
    /// A batch's checkpoint; rows read but neither written nor failed were
    /// skipped by the guard. The duration is set when it is written.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        segment: u64,
        batch_no: u64,
        lower: Option<&Key>,
        upper: Key,
        read: u64,
        changed: u64,
        failed: u64,
        batch_size: u64,
    ) -> Checkpoint {
        Checkpoint {
            batch_no,
            lower: lower.cloned(),
            upper,
            rows_read: read,
            rows_changed: changed,
            rows_skipped: read.saturating_sub(changed + failed),
            rows_failed: failed,
            batch_size,
            duration_ms: 0,
            segment,
        }
    }
}

/// Writes a batch's checkpoint and the run's counters (inside the batch's transaction).
pub async fn checkpoint(db: &Db, c: &mut impl Exec, run_id: &str, cp: &Checkpoint) -> Result<(), sqlx::Error> {
    let now = now();
    c.execute(&db.q(
        "INSERT INTO infill_batches (run_id, batch_no, segment, lower_key, upper_key, rows_read, rows_changed, rows_skipped, rows_failed, batch_size, duration_ms, committed_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        vec![
            Value::Text(run_id.into()),
            Value::Int(cp.batch_no as i64),
            Value::Int(cp.segment as i64),
            key_text(&cp.lower),
            key_text(&Some(cp.upper.clone())),
            Value::Int(cp.rows_read as i64),
            Value::Int(cp.rows_changed as i64),
            Value::Int(cp.rows_skipped as i64),
            Value::Int(cp.rows_failed as i64),
            Value::Int(cp.batch_size as i64),
            Value::Int(cp.duration_ms as i64),
            Value::Text(now.clone()),
        ],
    ))
    .await?;
    c.execute(&db.q(
        "UPDATE infill_runs SET cursor_key = ?, segment = ?, batches = batches + 1, rows_read = rows_read + ?, \
         rows_changed = rows_changed + ?, rows_skipped = rows_skipped + ?, rows_failed = rows_failed + ?, batch_size = ?, updated_at = ? WHERE id = ?",
        vec![
            key_text(&Some(cp.upper.clone())),
            Value::Int(cp.segment as i64),
            Value::Int(cp.rows_read as i64),
            Value::Int(cp.rows_changed as i64),
            Value::Int(cp.rows_skipped as i64),
            Value::Int(cp.rows_failed as i64),
            Value::Int(cp.batch_size as i64),
            Value::Text(now),
            Value::Text(run_id.into()),
        ],
    ))
    .await?;
    Ok(())
}

/// One undo image: a row's key with the values before and after infill wrote.
pub struct UndoImage {
    pub key: serde_json::Value,
    pub before: serde_json::Value,
    pub after: serde_json::Value,
}

/// Stores undo images (inside the batch's transaction): a row of
/// `infill_undo` holds up to IMAGES_PER_ROW images as three JSON arrays
/// (keys, befores, afters), `seq` numbering the rows of a batch.
pub async fn insert_undo(
    db: &Db,
    c: &mut impl Exec,
    run_id: &str,
    batch_no: u64,
    images: &[UndoImage],
) -> Result<(), sqlx::Error> {
    const IMAGES_PER_ROW: usize = 1000;
    for (seq, chunk) in images.chunks(IMAGES_PER_ROW).enumerate() {
        let array = |f: fn(&UndoImage) -> &serde_json::Value| {
            Value::Text(serde_json::Value::Array(chunk.iter().map(|i| f(i).clone()).collect()).to_string())
        };
        c.execute(&db.q(
            "INSERT INTO infill_undo (run_id, batch_no, seq, row_key, before_image, after_image) VALUES (?, ?, ?, ?, ?, ?)",
            vec![
                Value::Text(run_id.into()),
                Value::Int(batch_no as i64),
                Value::Int(seq as i64),
                array(|i| &i.key),
                array(|i| &i.before),
                array(|i| &i.after),
            ],
        ))
        .await?;
    }
    Ok(())
}

/// A row that failed alone (after bisection), in `infill_failures`.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub run_id: String,
    pub batch_no: u64,
    pub key: serde_json::Value,
    pub error_code: Option<String>,
    pub message: String,
    pub failed_at: String,
}

/// Records a failed row (inside the transaction of its checkpoint).
pub async fn insert_failure(db: &Db, c: &mut impl Exec, f: &Failure) -> Result<(), sqlx::Error> {
    c.execute(&db.q(
        "INSERT INTO infill_failures (run_id, batch_no, row_key, error_code, message, failed_at) VALUES (?, ?, ?, ?, ?, ?)",
        vec![
            Value::Text(f.run_id.clone()),
            Value::Int(f.batch_no as i64),
            Value::Text(f.key.to_string()),
            f.error_code.clone().map(Value::Text).unwrap_or(Value::Null),
            Value::Text(f.message.clone()),
            Value::Text(f.failed_at.clone()),
        ],
    ))
    .await?;
    Ok(())
}

/// The failed rows of a run, in key order of their batches.
pub async fn list_failures(db: &Db, c: &mut impl Exec, run_id: &str) -> Result<Vec<Failure>> {
    let rows = c
        .fetch(&db.q(
            "SELECT run_id, batch_no, row_key, error_code, message, failed_at FROM infill_failures WHERE run_id = ? ORDER BY batch_no",
            vec![Value::Text(run_id.into())],
        ))
        .await
        .map_err(Error::db("cannot read infill_failures"))?;
    Ok(rows
        .iter()
        .map(|r| Failure {
            run_id: text(&r[0]),
            batch_no: int(&r[1]),
            key: serde_json::from_str(&text(&r[2])).unwrap_or(serde_json::Value::Null),
            error_code: opt_text(&r[3]),
            message: text(&r[4]),
            failed_at: text(&r[5]),
        })
        .collect())
}

/// Checkpoints of a run after `after_batch`, in order (to restore audit
/// lines lost to a kill between a commit and its log line).
pub async fn batches_after(db: &Db, c: &mut impl Exec, run_id: &str, after_batch: u64) -> Result<Vec<Checkpoint>> {
    let rows = c
        .fetch(&db.q(
            "SELECT batch_no, segment, lower_key, upper_key, rows_read, rows_changed, rows_skipped, rows_failed, batch_size, duration_ms \
             FROM infill_batches WHERE run_id = ? AND batch_no > ? ORDER BY batch_no",
            vec![Value::Text(run_id.into()), Value::Int(after_batch as i64)],
        ))
        .await
        .map_err(Error::db("cannot read infill_batches"))?;
    Ok(rows
        .iter()
        .map(|r| Checkpoint {
            batch_no: int(&r[0]),
            segment: int(&r[1]),
            lower: parse_key(&r[2]),
            upper: parse_key(&r[3]).unwrap_or_default(),
            rows_read: int(&r[4]),
            rows_changed: int(&r[5]),
            rows_skipped: int(&r[6]),
            rows_failed: int(&r[7]),
            batch_size: int(&r[8]),
            duration_ms: int(&r[9]),
        })
        .collect())
}
