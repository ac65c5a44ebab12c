//! Raw TOML in, validated and typed jobs out, before any connection opens.
//! Every error points at the file, line, column and field that caused it, so
//! an operator fixes the spec, not a stack trace.

mod raw;
mod settings;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

pub use settings::{
    ApprovalPolicy, BUILTIN_PROBES, Drift, ENGINE_MAX_BATCH, MaxFailures, Probe, Rate, Settings, parse_duration,
};

use crate::error::{Error, Result};
use crate::secret::{Redactor, redact_url};
use crate::sql::Fragment;
use crate::value::Value;
use raw::{RawJob, RawSpec, StringOrList};

/// Where in a spec file something stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// A SQL fragment from the spec, with where it was written.
#[derive(Debug, Clone, Serialize)]
pub struct SqlText {
    pub sql: String,
    /// The spec field, e.g. `jobs.fill.source.where`.
    pub field: String,
    #[serde(skip)]
    pub location: Location,
}

/// The type of a param, as `params.NAME = { type = "..." }` declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamKind {
    Int,
    Text,
    Bool,
    Timestamp,
    Date,
    Secret,
}

impl ParamKind {
    fn parse(s: &str) -> Option<ParamKind> {
        Some(match s {
            "int" | "integer" => ParamKind::Int,
            "text" | "string" => ParamKind::Text,
            "bool" | "boolean" => ParamKind::Bool,
            "timestamp" => ParamKind::Timestamp,
            "date" => ParamKind::Date,
            "secret" => ParamKind::Secret,
            _ => return None,
        })
    }

    /// Parses a value given on the command line or as a default.
    pub fn value(self, text: &str) -> std::result::Result<Value, String> {
        let t = text.trim();
        match self {
            ParamKind::Int => t
                .parse::<i64>()
                .map(Value::Int)
                .map_err(|_| format!("`{text}` is not an int")),
            ParamKind::Text | ParamKind::Secret => Ok(Value::Text(text.to_string())),
            ParamKind::Bool => match t.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(Value::Bool(true)),
                "false" | "0" | "no" | "off" => Ok(Value::Bool(false)),
                _ => Err(format!("`{text}` is not a bool (true or false)")),
            },
            ParamKind::Date => t
                .parse::<chrono::NaiveDate>()
                .map(Value::Date)
                .map_err(|_| format!("`{text}` is not a date (YYYY-MM-DD)")),
            ParamKind::Timestamp => parse_timestamp(t).ok_or_else(|| {
                format!("`{text}` is not a timestamp (YYYY-MM-DD, YYYY-MM-DD HH:MM:SS, or RFC 3339 with an offset)")
            }),
        }
    }
}

fn parse_timestamp(t: &str) -> Option<Value> {
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(t) {
        return Some(Value::TimestampTz(dt.with_timezone(&chrono::Utc)));
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(ts) = chrono::NaiveDateTime::parse_from_str(t, fmt) {
            return Some(Value::Timestamp(ts));
        }
    }
    t.parse::<chrono::NaiveDate>()
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(Value::Timestamp)
}

/// A declared param.
#[derive(Debug, Clone, Serialize)]
pub struct ParamDecl {
    pub name: String,
    pub kind: ParamKind,
    /// The default as written, parsed at resolve time.
    pub default: Option<String>,
    #[serde(skip)]
    pub location: Location,
}

/// What a check's number must be.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Expect {
    /// Exactly this value.
    Equal(f64),
    /// Within these bounds (inclusive).
    Range { min: Option<f64>, max: Option<f64> },
}

impl Expect {
    /// True when `value` satisfies the expectation.
    pub fn accepts(&self, value: f64) -> bool {
        match self {
            Expect::Equal(e) => value == *e,
            Expect::Range { min, max } => min.is_none_or(|m| value >= m) && max.is_none_or(|m| value <= m),
        }
    }

    fn parse(v: &toml::Value) -> std::result::Result<Expect, String> {
        let num = |v: &toml::Value| match v {
            toml::Value::Integer(i) => Some(*i as f64),
            toml::Value::Float(f) => Some(*f),
            _ => None,
        };
        if let Some(n) = num(v) {
            return Ok(Expect::Equal(n));
        }
        let toml::Value::Table(t) = v else {
            return Err("write a number (expect = 0) or bounds (expect = { min = 1, max = 10 })".into());
        };
        if let Some(k) = t.keys().find(|k| *k != "min" && *k != "max") {
            return Err(format!("unknown bound `{k}` (use min and max)"));
        }
        let bound = |k: &str| match t.get(k) {
            None => Ok(None),
            Some(v) => num(v).map(Some).ok_or_else(|| format!("`{k}` must be a number")),
        };
        let (min, max) = (bound("min")?, bound("max")?);
        if min.is_none() && max.is_none() {
            return Err("give min, max or both".into());
        }
        Ok(Expect::Range { min, max })
    }
}

/// `[[jobs.J.checks]]`: a query returning one number, and what it must be.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub sql: SqlText,
    pub expect: Expect,
}

/// `action.insert`: a row into `table` per candidate, conflict-safe.
#[derive(Debug, Clone)]
pub struct Insert {
    /// `action.table` (default `source.table`), split on dots.
    pub table: Vec<String>,
    pub table_at: Location,
    /// Column and expression; `:name` binds a param or a column of the row.
    pub columns: Vec<(String, SqlText)>,
}

/// The format of a `source.file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// Comma-separated, with a header line naming the fields.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// Where a job's candidate rows come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Rows of `source.table` matching `source.where`: written set-based,
    /// the predicate re-checked in the write.
    Table,
    /// Any SELECT on `database`, paged by `source.key` around it.
    Query { sql: SqlText, database: String },
    /// Rows of `sql` on `from` whose key is missing from `missing_in` on
    /// the job's database.
    Diff {
        from: String,
        sql: SqlText,
        missing_in: Vec<String>,
        missing_at: Location,
    },
    /// Records of a CSV or JSONL file, in file order.
    File {
        path: PathBuf,
        format: FileFormat,
        at: Location,
    },
}

impl Source {
    /// True for the sources whose rows are read page by page and applied
    /// one by one (every source but `table`).
    pub fn is_stream(&self) -> bool {
        !matches!(self, Source::Table)
    }

    /// The SQL fragment that reads rows, if any.
    pub fn sql(&self) -> Option<&SqlText> {
        match self {
            Source::Query { sql, .. } | Source::Diff { sql, .. } => Some(sql),
            _ => None,
        }
    }

    /// The named database the rows are read from, for SQL sources.
    pub fn database<'a>(&'a self, job_database: &'a str) -> Option<&'a str> {
        match self {
            Source::Table => Some(job_database),
            Source::Query { database, .. } => Some(database),
            Source::Diff { from, .. } => Some(from),
            Source::File { .. } => None,
        }
    }
}

/// A template's text and the name errors give it (its file, or `body`).
#[derive(Debug, Clone)]
pub struct TemplateText {
    pub name: String,
    pub text: String,
}

/// `action.exec`: a command per row.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// The program: a path (relative ones resolved against the spec's
    /// folder) or a name found on PATH.
    pub program: std::path::PathBuf,
    pub args: Vec<String>,
    pub stdin: Option<TemplateText>,
    pub timeout: std::time::Duration,
    /// Variables passed on from infill's environment, besides PATH.
    pub pass_env: Vec<String>,
    /// The working directory: the spec's folder.
    pub dir: std::path::PathBuf,
    pub location: Location,
}

/// `action.export`: the rows to a file.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    pub path: std::path::PathBuf,
    pub template: Option<TemplateText>,
    pub location: Location,
}

/// `action.http`, before `${VAR}` expansion.
#[derive(Debug, Clone)]
pub struct HttpSpec {
    pub url: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<TemplateText>,
    pub timeout: std::time::Duration,
    pub max_attempts: u32,
    pub idempotency_header: String,
    pub location: Location,
}

/// `action.http`'s URL and headers with `${VAR}`s expanded (registered as
/// secrets: masked wherever they are shown).
#[derive(Clone)]
pub struct HttpTarget {
    pub url: String,
    pub headers: Vec<(String, String)>,
}

impl fmt::Debug for HttpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTarget").finish_non_exhaustive()
    }
}

/// One validated job of the spec.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub description: Option<String>,
    /// The named database the job writes to (`target` unless `database = ...`).
    pub database: String,
    /// Where the candidates come from.
    pub source: Source,
    /// `source.table` (with another source: `action.table`, empty for a
    /// `call` that names none), split on dots, each part kept as written.
    pub table: Vec<String>,
    /// Where `source.table` is written.
    pub table_at: Location,
    pub key: Vec<String>,
    /// Where `source.key` is written.
    pub key_at: Location,
    pub filter: Option<SqlText>,
    /// `action.update.<column> = <expression>`, in column order.
    pub updates: Vec<(String, SqlText)>,
    /// `action.call`: one statement per row; `:name` binds a param or a
    /// column of the row.
    pub call: Option<SqlText>,
    /// `action.insert.<column> = <expression>` into `action.table`.
    pub insert: Option<Insert>,
    /// `action.http`: an event per row.
    pub http: Option<HttpSpec>,
    /// `action.exec`: a command per row.
    pub exec: Option<ExecSpec>,
    /// `action.export`: the rows to a file.
    pub export: Option<ExportSpec>,
    pub params: Vec<ParamDecl>,
    pub undo: bool,
    pub depends_on: Vec<String>,
    /// Verification queries, run by `infill verify` and after the job.
    pub checks: Vec<Check>,
    /// `priority = [...]`: predicates whose rows run first, in order.
    pub priority: Vec<SqlText>,
    /// `categories.NAME = "<predicate>"`: how `plan` breaks the candidates down.
    pub categories: Vec<(String, SqlText)>,
    /// sha256 of the normalised definition (source, action, params, undo,
    /// priority): a run refuses to continue under a different one.
    pub definition_sha256: String,
    /// sha256 of the definition plus checks and categories: what an
    /// approval covers (see `plan`).
    pub approval_sha256: String,
    pub location: Location,
    settings: raw::RawSettings,
}

impl Job {
    /// True when the job's rows are read page by page and acted on one by
    /// one (a query, diff or file source, or an http action), not written
    /// set-based.
    pub fn reads_pages(&self) -> bool {
        self.source.is_stream() || self.outside()
    }

    /// True when the action writes no database (http, exec, export): its
    /// state is kept in the state database, and its effects have no undo.
    pub fn outside(&self) -> bool {
        self.http.is_some() || self.exec.is_some() || self.export.is_some()
    }

    /// Every SQL fragment of the job, for validation against the target.
    pub fn fragments(&self) -> impl Iterator<Item = &SqlText> {
        self.filter
            .iter()
            .chain(self.updates.iter().map(|(_, s)| s))
            .chain(self.call.iter())
            .chain(self.insert.iter().flat_map(|i| i.columns.iter().map(|(_, s)| s)))
            .chain(self.priority.iter())
            .chain(self.categories.iter().map(|(_, s)| s))
    }
}

/// A loaded, validated spec file. Its `Debug` leaves out the file's text
/// and database URLs, which may hold a password written in clear.
pub struct Spec {
    pub path: PathBuf,
    /// The folder the spec stands in: relative paths start here.
    pub dir: PathBuf,
    /// sha256 of the file's bytes, for the audit log.
    pub sha256: String,
    pub jobs: BTreeMap<String, Job>,
    text: String,
    raw: RawSpec,
}

impl fmt::Debug for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spec")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .field("jobs", &self.jobs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What a caller chooses on the command line for one job.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub env: Option<String>,
    /// `--param k=v`, as given.
    pub params: Vec<(String, String)>,
    pub batch_size: Option<usize>,
    pub rate: Option<String>,
    /// `--concurrency N`, over the spec's `concurrency`.
    pub concurrency: Option<u64>,
}

impl Overrides {
    /// With the settings a run kept from its command line (`live_settings`
    /// pairs), where this one gives none of its own.
    pub fn with_live_settings(mut self, kept: &BTreeMap<String, String>) -> Overrides {
        if let (None, Some(r)) = (&self.rate, kept.get("rate")) {
            self.rate = Some(r.clone());
        }
        if self.batch_size.is_none() {
            self.batch_size = kept.get("batch_size").and_then(|n| n.parse().ok());
        }
        if self.concurrency.is_none() {
            self.concurrency = kept.get("concurrency").and_then(|n| n.parse().ok());
        }
        self
    }

    /// The settings given, as the `infill set` pairs that mean the same.
    pub fn live_settings(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        if let Some(r) = &self.rate {
            m.insert("rate".to_string(), r.clone());
        }
        if let Some(n) = self.batch_size {
            m.insert("batch_size".to_string(), n.to_string());
        }
        if let Some(n) = self.concurrency {
            m.insert("concurrency".to_string(), n.to_string());
        }
        m
    }
}

/// A named database after `${VAR}` expansion. Its `Debug` never shows the password.
#[derive(Clone)]
pub struct DatabaseUrl {
    pub name: String,
    url: String,
}

impl DatabaseUrl {
    /// Builds one from a URL used as is.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> DatabaseUrl {
        DatabaseUrl {
            name: name.into(),
            url: url.into(),
        }
    }
    /// The URL with its password: only for connecting.
    pub fn expose(&self) -> &str {
        &self.url
    }
    /// The URL with the password masked.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({} = {})", self.name, self.redacted())
    }
}

/// A job ready to run: target, params and settings resolved.
#[derive(Debug, Clone)]
pub struct ResolvedJob {
    pub job: Job,
    pub target: DatabaseUrl,
    /// The database a `query` or `diff` source reads, where it is not the
    /// target.
    pub source_db: Option<DatabaseUrl>,
    /// `action.http`, expanded.
    pub http: Option<HttpTarget>,
    /// Where a diff's `missing_in` is looked up when that is not the target
    /// (an http job keeps its state apart from the job's database).
    pub lookup_db: Option<DatabaseUrl>,
    /// The databases health probes run on (a replica), by `[databases]`
    /// name, where not the target.
    pub probe_dbs: BTreeMap<String, DatabaseUrl>,
    pub env: Option<String>,
    pub params: BTreeMap<String, Value>,
    pub settings: Settings,
    /// The live settings given on the command line (`--rate`,
    /// `--batch-size`, `--concurrency`), as `infill set` pairs: a run keeps
    /// them, so `infill resume` does not drop a throttle the operator chose.
    pub command_line: BTreeMap<String, String>,
    /// Set where `require_approval = true` applies: what a run must show.
    pub approval: Option<ApprovalPolicy>,
    pub log_dir: PathBuf,
    pub redactor: Redactor,
}

impl ResolvedJob {
    /// Params as JSON (secrets masked), for state and the audit log.
    pub fn params_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, v) in &self.params {
            let secret = self
                .job
                .params
                .iter()
                .any(|p| &p.name == k && p.kind == ParamKind::Secret);
            m.insert(k.clone(), if secret { "***".into() } else { v.to_json() });
        }
        serde_json::Value::Object(m)
    }
}

impl Spec {
    /// Reads and validates a spec file.
    pub fn load(path: impl AsRef<Path>) -> Result<Spec> {
        let path = path.as_ref().to_path_buf();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Usage(format!(
                    "spec file {} not found (pass the spec as the first argument or with --spec)",
                    path.display()
                ))
            } else {
                Error::Io {
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        Spec::parse(path, text)
    }

    /// Validates a spec given as text; `path` is used for messages and relative paths.
    pub fn parse(path: PathBuf, text: String) -> Result<Spec> {
        let dir = path
            .parent()
            .map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p })
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let sha256 = hex::encode(Sha256::digest(text.as_bytes()));
        let raw: RawSpec = match toml::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let location = location_of(&path, &text, span.start);
                return Err(Error::Spec {
                    location,
                    field: field_at(&text, span.start),
                    message: e.message().trim().to_string(),
                });
            }
        };
        let mut spec = Spec {
            path,
            dir,
            sha256,
            jobs: BTreeMap::new(),
            text,
            raw,
        };
        spec.validate()?;
        Ok(spec)
    }

    fn location(&self, span: Range<usize>) -> Location {
        location_of(&self.path, &self.text, span.start)
    }

    fn err(&self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Spec {
            location: self.location(span),
            field: field.into(),
            message: message.into(),
        }
    }

    fn validate(&mut self) -> Result<()> {
        if self.raw.jobs.is_empty() {
            return Err(self.err(
                0..0,
                "jobs",
                "the spec has no [jobs.NAME] table; define at least one job",
            ));
        }
        let mut jobs = BTreeMap::new();
        for (name, raw) in &self.raw.jobs {
            let job = self.validate_job(name, raw)?;
            jobs.insert(name.clone(), job);
        }
        for job in jobs.values() {
            let raw = &self.raw.jobs[&job.name];
            for dep in &raw.get_ref().depends_on {
                if !jobs.contains_key(dep.get_ref()) {
                    return Err(self.err(
                        dep.span(),
                        format!("jobs.{}.depends_on", job.name),
                        format!("unknown job `{}`", dep.get_ref()),
                    ));
                }
            }
        }
        self.jobs = jobs;
        self.job_order(self.jobs.keys().cloned().collect())?;
        // Settings must parse wherever they stand.
        Settings::check(&self.raw.defaults.settings(), "defaults", &|s, f, m| self.err(s, f, m))?;
        self.check_probe_databases(&self.raw.defaults.settings(), "defaults")?;
        let d = &self.raw.defaults;
        self.check_approval_keys("defaults", &d.approval_ttl, &d.drift)?;
        for (name, env) in &self.raw.env {
            let e = env.get_ref();
            Settings::check(&e.settings(), &format!("env.{name}"), &|s, f, m| self.err(s, f, m))?;
            self.check_probe_databases(&e.settings(), &format!("env.{name}"))?;
            self.check_approval_keys(&format!("env.{name}"), &e.approval_ttl, &e.drift)?;
        }
        Ok(())
    }

    /// A probe's `database` must be one of `[databases]` (or of an
    /// environment's).
    fn check_probe_databases(&self, raw: &raw::RawSettings, prefix: &str) -> Result<()> {
        for (name, p) in &raw.probes {
            let Some(db) = &p.get_ref().database else { continue };
            let known = self.raw.databases.contains_key(db)
                || self.raw.env.values().any(|e| e.get_ref().databases.contains_key(db));
            if !known {
                let mut names: Vec<&str> = self.raw.databases.keys().map(String::as_str).collect();
                for e in self.raw.env.values() {
                    names.extend(e.get_ref().databases.keys().map(String::as_str));
                }
                names.sort_unstable();
                names.dedup();
                return Err(self.err(
                    p.span(),
                    format!("{prefix}.probes.{name}.database"),
                    format!("no database `{db}` in [databases] (there: {})", names.join(", ")),
                ));
            }
        }
        Ok(())
    }

    fn check_approval_keys(
        &self,
        prefix: &str,
        ttl: &Option<Spanned<String>>,
        drift: &Option<Spanned<toml::Value>>,
    ) -> Result<()> {
        if let Some(t) = ttl {
            parse_duration(t.get_ref()).map_err(|m| self.err(t.span(), format!("{prefix}.approval_ttl"), m))?;
        }
        if let Some(d) = drift {
            Drift::parse(d.get_ref()).map_err(|m| self.err(d.span(), format!("{prefix}.drift"), m))?;
        }
        Ok(())
    }

    /// The approval policy of an environment (or of `[defaults]` alone).
    fn approval_policy(&self, env: Option<&raw::RawEnv>) -> Option<ApprovalPolicy> {
        let d = &self.raw.defaults;
        macro_rules! pick {
            ($field:ident) => {
                env.and_then(|e| e.$field.as_ref())
                    .or(d.$field.as_ref())
                    .map(|v| v.get_ref())
            };
        }
        if !pick!(require_approval).copied().unwrap_or(false) {
            return None;
        }
        Some(ApprovalPolicy {
            ttl: pick!(approval_ttl).map(|t| parse_duration(t).expect("checked at load")),
            approver_must_differ: pick!(approver_must_differ).copied().unwrap_or(false),
            drift: pick!(drift)
                .map(|v| Drift::parse(v).expect("checked at load"))
                .unwrap_or(Drift::Rows(0)),
        })
    }

    fn validate_http(&self, job: &str, h: &Spanned<raw::RawHttp>) -> Result<HttpSpec> {
        let raw = h.get_ref();
        let field = |f: &str| format!("jobs.{job}.action.http.{f}");
        let method = raw.method.clone().unwrap_or_else(|| "POST".into()).to_ascii_uppercase();
        if !["POST", "PUT", "PATCH", "DELETE", "GET"].contains(&method.as_str()) {
            return Err(self.err(h.span(), field("method"), format!("unknown method `{method}`")));
        }
        let timeout = match &raw.timeout {
            Some(t) => parse_duration(t.get_ref()).map_err(|m| self.err(t.span(), field("timeout"), m))?,
            None => std::time::Duration::from_secs(30),
        };
        let max_attempts = match &raw.max_attempts {
            Some(n) if *n.get_ref() >= 1 && *n.get_ref() <= 100 => *n.get_ref() as u32,
            Some(n) => return Err(self.err(n.span(), field("max_attempts"), "must be between 1 and 100")),
            None => 5,
        };
        let body = raw.body.as_ref().map(|b| self.template(b, field("body"))).transpose()?;
        let spec = HttpSpec {
            url: raw.url.get_ref().clone(),
            method,
            headers: raw.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            body,
            timeout,
            max_attempts,
            idempotency_header: raw
                .idempotency_header
                .clone()
                .unwrap_or_else(|| "Idempotency-Key".into()),
            location: self.location(h.span()),
        };
        // Syntax errors now; undefined names when rows are rendered (plan,
        // dry run).
        crate::http::Renderer::new(spec.body.as_ref(), &spec.location, field("body"))?;
        Ok(spec)
    }

    /// A template written inline (it holds `{{`, `{%`, or starts as JSON)
    /// or the path of a template file, relative to the spec.
    fn template(&self, s: &Spanned<String>, field: String) -> Result<TemplateText> {
        let text = s.get_ref();
        if text.contains("{{") || text.contains("{%") || text.trim_start().starts_with(['{', '[']) {
            return Ok(TemplateText {
                name: field.rsplit('.').next().unwrap_or("template").to_string(),
                text: text.clone(),
            });
        }
        let path = self.dir.join(text);
        let content = std::fs::read_to_string(&path).map_err(|e| {
            self.err(
                s.span(),
                field,
                format!("cannot read the template {}: {e}", path.display()),
            )
        })?;
        Ok(TemplateText {
            name: text.clone(),
            text: content,
        })
    }

    fn validate_exec(&self, job: &str, e: &Spanned<raw::RawExec>) -> Result<ExecSpec> {
        let raw = e.get_ref();
        let field = |f: &str| format!("jobs.{job}.action.exec.{f}");
        let (program, args) = match raw.command.get_ref().split_first() {
            Some((p, a)) if !p.trim().is_empty() => (p.clone(), a.to_vec()),
            _ => {
                return Err(self.err(
                    raw.command.span(),
                    field("command"),
                    "name the program and its arguments: command = [\"./notify.sh\", \"--flag\"]",
                ));
            }
        };
        let program = if program.contains('/') {
            let path = self.dir.join(&program);
            if !path.is_file() {
                return Err(self.err(
                    raw.command.span(),
                    field("command"),
                    format!("no program at {}", path.display()),
                ));
            }
            path
        } else {
            let found = std::env::var_os("PATH").map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(&program))
                    .find(|c| c.is_file())
            });
            match found.flatten() {
                Some(path) => path,
                None => {
                    return Err(self.err(
                        raw.command.span(),
                        field("command"),
                        format!("`{program}` is not on PATH; give its path (relative to the spec) instead"),
                    ));
                }
            }
        };
        let timeout = match &raw.timeout {
            Some(t) => parse_duration(t.get_ref()).map_err(|m| self.err(t.span(), field("timeout"), m))?,
            None => std::time::Duration::from_secs(60),
        };
        let stdin = raw
            .stdin
            .as_ref()
            .map(|s| self.template(s, field("stdin")))
            .transpose()?;
        let spec = ExecSpec {
            program,
            args,
            stdin,
            timeout,
            pass_env: raw.env.clone(),
            dir: self.dir.clone(),
            location: self.location(e.span()),
        };
        crate::http::Renderer::new(spec.stdin.as_ref(), &spec.location, field("stdin"))?;
        Ok(spec)
    }

    fn validate_export(&self, job: &str, e: &Spanned<raw::RawExport>) -> Result<ExportSpec> {
        let raw = e.get_ref();
        let field = |f: &str| format!("jobs.{job}.action.export.{f}");
        let path = raw.path.get_ref();
        if !(path.ends_with(".json") || path.ends_with(".jsonl") || path.ends_with(".ndjson")) {
            return Err(self.err(
                raw.path.span(),
                field("path"),
                "name a .json file (one array) or a .jsonl file (an object per line)",
            ));
        }
        let template = raw
            .template
            .as_ref()
            .map(|t| self.template(t, field("template")))
            .transpose()?;
        let spec = ExportSpec {
            path: self.dir.join(path),
            template,
            location: self.location(e.span()),
        };
        crate::http::Renderer::new(spec.template.as_ref(), &spec.location, field("template"))?;
        Ok(spec)
    }

    fn validate_job(&self, name: &str, spanned: &Spanned<RawJob>) -> Result<Job> {
        let raw = spanned.get_ref();
        let jf = |f: &str| format!("jobs.{name}.{f}");
        let job_span = spanned.span();
        let source = raw.source.as_ref().ok_or_else(|| {
            self.err(
                job_span.clone(),
                jf("source"),
                "missing: say where the rows come from (source.table = \"...\")",
            )
        })?;
        let src = source.get_ref();
        let given: Vec<&str> = [
            ("table", src.table.is_some()),
            ("query", src.query.is_some()),
            ("diff", src.diff.is_some()),
            ("file", src.file.is_some()),
        ]
        .into_iter()
        .filter(|(_, present)| *present)
        .map(|(k, _)| k)
        .collect();
        if given.len() > 1 {
            return Err(self.err(
                source.span(),
                jf("source"),
                format!(
                    "a job has one source, this one has {}: keep one of them",
                    given
                        .iter()
                        .map(|k| format!("source.{k}"))
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            ));
        }
        if given.is_empty() {
            return Err(self.err(
                source.span(),
                jf("source.table"),
                "missing: name the table to backfill (source.table), or give source.query, source.diff or source.file",
            ));
        }
        let key_spanned = src
            .key
            .as_ref()
            .or(src.diff.as_ref().and_then(|d| d.get_ref().key.as_ref()))
            .ok_or_else(|| {
                self.err(
                    source.span(),
                    jf("source.key"),
                    "missing: name the key column(s), e.g. source.key = [\"id\"]",
                )
            })?;
        let key = match key_spanned.get_ref() {
            StringOrList::One(k) => vec![k.clone()],
            StringOrList::Many(ks) => ks.clone(),
        };
        if key.is_empty() || key.iter().any(|k| k.trim().is_empty()) {
            return Err(self.err(
                key_spanned.span(),
                jf("source.key"),
                "needs at least one non-empty column name",
            ));
        }
        let split_table = |t: &Spanned<String>, field: &str| -> Result<Vec<String>> {
            let parts: Vec<String> = t.get_ref().split('.').map(str::to_string).collect();
            if parts.iter().any(|p| p.is_empty()) {
                return Err(self.err(t.span(), jf(field), "empty name part"));
            }
            Ok(parts)
        };
        let act_table = raw.action.as_ref().and_then(|a| a.get_ref().table.as_ref());
        let stream_only = |present: bool, span: Range<usize>, field: &str| -> Result<()> {
            if present && src.table.is_none() {
                return Err(self.err(
                    span,
                    jf(field),
                    format!(
                        "{field} applies to source.table only; with another source, put the condition in its query"
                    ),
                ));
            }
            Ok(())
        };
        if let Some(w) = &src.where_ {
            stream_only(true, w.span(), "source.where")?;
        }
        if let Some((_, c)) = raw.categories.iter().next() {
            stream_only(true, c.span(), "categories")?;
        }
        if let Some(p) = raw.priority.first() {
            stream_only(true, p.span(), "priority")?;
        }
        let database_of = |d: &Spanned<String>| d.get_ref().clone();
        let (source_kind, table_spanned) = if let Some(t) = &src.table {
            (Source::Table, Some(t))
        } else if let Some(q) = &src.query {
            let database = src.database.as_ref().map(database_of).unwrap_or_else(|| {
                raw.database
                    .as_ref()
                    .map(|d| d.get_ref().clone())
                    .unwrap_or_else(|| "target".into())
            });
            let text = SqlText {
                sql: q.get_ref().clone(),
                field: jf("source.query"),
                location: self.location(q.span()),
            };
            (Source::Query { sql: text, database }, act_table)
        } else if let Some(d) = &src.diff {
            let diff = d.get_ref();
            let text = SqlText {
                sql: diff.query.get_ref().clone(),
                field: jf("source.diff.query"),
                location: self.location(diff.query.span()),
            };
            (
                Source::Diff {
                    from: diff.from.get_ref().clone(),
                    sql: text,
                    missing_in: split_table(&diff.missing_in, "source.diff.missing_in")?,
                    missing_at: self.location(diff.missing_in.span()),
                },
                act_table,
            )
        } else {
            let f = src.file.as_ref().expect("one source is given");
            let (path, format) = match f.get_ref() {
                raw::RawFile::Path(p) => (p.clone(), None),
                raw::RawFile::Table { path, format } => (path.clone(), format.clone()),
            };
            let format = match format.as_deref().map(str::to_ascii_lowercase).as_deref() {
                Some("csv") => FileFormat::Csv,
                Some("jsonl") | Some("ndjson") => FileFormat::Jsonl,
                Some(other) => {
                    return Err(self.err(
                        f.span(),
                        jf("source.file.format"),
                        format!("unknown format `{other}`: use csv or jsonl"),
                    ));
                }
                None if path.ends_with(".csv") => FileFormat::Csv,
                None if path.ends_with(".jsonl") || path.ends_with(".ndjson") => FileFormat::Jsonl,
                None => {
                    return Err(self.err(
                        f.span(),
                        jf("source.file"),
                        "cannot tell the format from the name; write source.file = { path = \"...\", format = \"csv\" } (or \"jsonl\")",
                    ));
                }
            };
            (
                Source::File {
                    path: self.dir.join(path),
                    format,
                    at: self.location(f.span()),
                },
                act_table,
            )
        };
        if let Source::Query { sql, .. } | Source::Diff { sql, .. } = &source_kind
            && sql.sql.trim().is_empty()
        {
            return Err(self.err(source.span(), sql.field.clone(), "is empty"));
        }
        let table_parts: Vec<String> = match table_spanned {
            Some(t) if source_kind.is_stream() => split_table(t, "action.table")?,
            Some(t) => split_table(t, "source.table")?,
            None => Vec::new(),
        };
        let table_span = table_spanned.map(|t| t.span()).unwrap_or_else(|| source.span());

        let action = raw.action.as_ref().ok_or_else(|| {
            self.err(
                job_span.clone(),
                jf("action"),
                "missing: say what to do with each row (action.update.<column> = \"...\")",
            )
        })?;
        let act = action.get_ref();
        let actions = [
            act.update.as_ref().is_some_and(|u| !u.is_empty()),
            act.call.is_some(),
            act.insert.is_some(),
            act.http.is_some(),
            act.exec.is_some(),
            act.export.is_some(),
        ];
        if actions.iter().filter(|a| **a).count() > 1 {
            return Err(self.err(
                action.span(),
                jf("action"),
                "a job has one action: action.update, action.insert, action.call, action.http, action.exec or action.export",
            ));
        }
        let http = act.http.as_ref().map(|h| self.validate_http(name, h)).transpose()?;
        let exec = act.exec.as_ref().map(|e| self.validate_exec(name, e)).transpose()?;
        let export = act.export.as_ref().map(|e| self.validate_export(name, e)).transpose()?;
        let outside = http.is_some() || exec.is_some() || export.is_some();
        if let (Some(t), Some(st)) = (&act.table, &src.table)
            && t.get_ref() != st.get_ref()
            && act.insert.is_none()
        {
            return Err(self.err(
                t.span(),
                jf("action.table"),
                "with source.table, the action writes that table; leave action.table out",
            ));
        }
        let no_update = BTreeMap::new();
        let update = match (act.update.as_ref().filter(|u| !u.is_empty()), &act.call) {
            (Some(_), Some(c)) => {
                return Err(self.err(
                    c.span(),
                    jf("action.call"),
                    "a job has one action: action.update or action.call, not both",
                ));
            }
            (Some(u), None) => u,
            (None, Some(_)) => &no_update,
            (None, None) if act.insert.is_some() || outside => &no_update,
            (None, None) => {
                return Err(self.err(
                    action.span(),
                    jf("action.update"),
                    "missing: set at least one column (action.update.<column> = \"<SQL expression>\") or give action.insert or action.call",
                ));
            }
        };

        let mut params = Vec::new();
        for (pname, p) in &raw.params {
            let decl = p.get_ref();
            let kind = ParamKind::parse(decl.kind.get_ref()).ok_or_else(|| {
                self.err(
                    decl.kind.span(),
                    jf(&format!("params.{pname}.type")),
                    format!(
                        "unknown type `{}` (use int, text, bool, timestamp, date or secret)",
                        decl.kind.get_ref()
                    ),
                )
            })?;
            let default = match &decl.default {
                None => None,
                Some(d) => {
                    let text = match d.get_ref() {
                        toml::Value::String(s) => s.clone(),
                        other => toml_text(other),
                    };
                    kind.value(&text)
                        .map_err(|m| self.err(d.span(), jf(&format!("params.{pname}.default")), m))?;
                    Some(text)
                }
            };
            params.push(ParamDecl {
                name: pname.clone(),
                kind,
                default,
                location: self.location(p.span()),
            });
        }

        // `row_binds`: `:name` may also name a column of the row (checked
        // against the table when the run starts).
        let sql_with = |s: &Spanned<String>, field: String, row_binds: bool| -> Result<SqlText> {
            let frag = Fragment::parse(s.get_ref(), false).map_err(|m| self.err(s.span(), field.clone(), m))?;
            for p in frag.params() {
                if !row_binds && !params.iter().any(|d| d.name == p) {
                    return Err(self.err(
                        s.span(),
                        field.clone(),
                        format!("uses :{p}, which is not declared; add params.{p} = {{ type = \"...\" }} to the job"),
                    ));
                }
            }
            if s.get_ref().trim().is_empty() {
                return Err(self.err(s.span(), field.clone(), "is empty"));
            }
            Ok(SqlText {
                sql: s.get_ref().clone(),
                field,
                location: self.location(s.span()),
            })
        };
        let sql = |s: &Spanned<String>, field: String| sql_with(s, field, false);
        let call = act
            .call
            .as_ref()
            .map(|c| sql_with(c, jf("action.call"), true))
            .transpose()?;
        let insert = match &act.insert {
            None => None,
            Some(cols) if cols.get_ref().is_empty() => {
                return Err(self.err(
                    cols.span(),
                    jf("action.insert"),
                    "name at least one column (action.insert.<column> = \"<SQL expression>\")",
                ));
            }
            Some(cols) => {
                let (name, span) = match (&act.table, table_spanned) {
                    (Some(t), _) | (None, Some(t)) => (t.get_ref().clone(), t.span()),
                    (None, None) => {
                        return Err(self.err(
                            cols.span(),
                            jf("action.table"),
                            "missing: name the table the rows are inserted into (action.table = \"...\")",
                        ));
                    }
                };
                let parts: Vec<String> = name.split('.').map(str::to_string).collect();
                if parts.iter().any(|p| p.is_empty()) {
                    return Err(self.err(span, jf("action.table"), "empty name part"));
                }
                let columns = cols
                    .get_ref()
                    .iter()
                    .map(|(c, e)| Ok((c.clone(), sql_with(e, jf(&format!("action.insert.{c}")), true)?)))
                    .collect::<Result<Vec<_>>>()?;
                Some(Insert {
                    table: parts,
                    table_at: self.location(span),
                    columns,
                })
            }
        };
        let filter = src.where_.as_ref().map(|w| sql(w, jf("source.where"))).transpose()?;
        if !update.is_empty() && table_parts.is_empty() {
            return Err(self.err(
                action.span(),
                jf("action.table"),
                "missing: name the table the rows update (action.table = \"...\")",
            ));
        }
        // A source's query may bind params, never the row's columns.
        if let Some(text) = source_kind.sql() {
            let spanned = Spanned::new(
                match (&src.query, &src.diff) {
                    (Some(q), _) => q.span(),
                    (_, Some(d)) => d.get_ref().query.span(),
                    _ => source.span(),
                },
                text.sql.clone(),
            );
            sql(&spanned, text.field.clone())?;
        }
        let mut updates = Vec::new();
        for (col, expr) in update {
            if key.contains(col) {
                return Err(self.err(
                    expr.span(),
                    jf(&format!("action.update.{col}")),
                    "a key column cannot be updated: the key is how infill pages and resumes",
                ));
            }
            // With a query, diff or file source, `:name` may bind a field
            // of the row.
            let text = sql_with(expr, jf(&format!("action.update.{col}")), source_kind.is_stream())?;
            updates.push((col.clone(), text));
        }
        let categories = raw
            .categories
            .iter()
            .map(|(cname, c)| Ok((cname.clone(), sql(c, jf(&format!("categories.{cname}")))?)))
            .collect::<Result<Vec<_>>>()?;
        let priority = raw
            .priority
            .iter()
            .enumerate()
            .map(|(i, p)| sql(p, jf(&format!("priority[{i}]"))))
            .collect::<Result<Vec<_>>>()?;
        let mut checks = Vec::new();
        for (i, check) in raw.checks.iter().enumerate() {
            let c = check.get_ref();
            let expect = Expect::parse(c.expect.get_ref())
                .map_err(|m| self.err(c.expect.span(), jf(&format!("checks[{i}].expect")), m))?;
            checks.push(Check {
                name: c.name.get_ref().clone(),
                sql: sql(&c.sql, jf(&format!("checks[{i}].sql")))?,
                expect,
            });
        }
        Settings::check(&raw.settings(), &format!("jobs.{name}"), &|s, f, m| self.err(s, f, m))?;
        self.check_probe_databases(&raw.settings(), &format!("jobs.{name}"))?;

        type InsertDef<'a> = (&'a [String], Vec<(&'a str, &'a str)>);
        #[derive(Serialize)]
        struct Definition<'a> {
            database: &'a str,
            table: &'a [String],
            key: &'a [String],
            filter: Option<&'a str>,
            updates: Vec<(&'a str, &'a str)>,
            #[serde(skip_serializing_if = "Option::is_none")]
            call: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            insert: Option<InsertDef<'a>>,
            params: &'a [ParamDecl],
            undo: bool,
            priority: Vec<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            source: Option<serde_json::Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            http: Option<serde_json::Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            exec: Option<serde_json::Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            export: Option<serde_json::Value>,
        }
        let database = raw
            .database
            .as_ref()
            .map(|d| d.get_ref().clone())
            .unwrap_or_else(|| "target".into());
        // A call's or a request's effects cannot be imaged: their runs are
        // not undoable.
        let undo = call.is_none() && !outside && raw.undo.as_ref().map(|u| *u.get_ref()).unwrap_or(true);
        let def = Definition {
            database: &database,
            table: &table_parts,
            key: &key,
            filter: filter.as_ref().map(|f| f.sql.as_str()),
            updates: updates.iter().map(|(c, s)| (c.as_str(), s.sql.as_str())).collect(),
            call: call.as_ref().map(|c| c.sql.as_str()),
            insert: insert.as_ref().map(|i| {
                (
                    i.table.as_slice(),
                    i.columns.iter().map(|(c, s)| (c.as_str(), s.sql.as_str())).collect(),
                )
            }),
            params: &params,
            undo,
            priority: priority.iter().map(|p| p.sql.as_str()).collect(),
            http: None,
            exec: exec.as_ref().map(|e| {
                serde_json::json!({
                    "program": e.program, "args": e.args, "stdin": e.stdin.as_ref().map(|t| &t.text),
                    "env": e.pass_env,
                })
            }),
            export: export
                .as_ref()
                .map(|x| serde_json::json!({ "path": x.path, "template": x.template.as_ref().map(|t| &t.text) })),
            source: match &source_kind {
                Source::Table => None,
                Source::Query { sql, database } => Some(serde_json::json!({ "query": sql.sql, "database": database })),
                Source::Diff {
                    from, sql, missing_in, ..
                } => Some(serde_json::json!({ "diff": sql.sql, "from": from, "missing_in": missing_in })),
                // The file's content is not in the definition: a file
                // appended to since keeps its runs resumable.
                Source::File { path, format, .. } => Some(
                    serde_json::json!({ "file": path.file_name().map(|f| f.to_string_lossy().into_owned()), "format": format }),
                ),
            },
        };
        let def = Definition {
            // The request as written (`${VAR}`s unexpanded) and its template.
            http: http.as_ref().map(|h| {
                serde_json::json!({
                    "url": h.url, "method": h.method, "headers": h.headers,
                    "body": h.body.as_ref().map(|b| &b.text), "idempotency_header": h.idempotency_header,
                })
            }),
            ..def
        };
        let definition_sha256 = hex::encode(Sha256::digest(serde_json::to_vec(&def).expect("serialisable")));
        let approved = serde_json::json!({
            "definition": definition_sha256,
            "checks": checks.iter().map(|c| (&c.name, &c.sql.sql, &c.expect)).collect::<Vec<_>>(),
            "categories": categories.iter().map(|(n, c)| (n, &c.sql)).collect::<Vec<_>>(),
        });
        let approval_sha256 = hex::encode(Sha256::digest(approved.to_string().as_bytes()));
        Ok(Job {
            name: name.to_string(),
            description: raw.description.clone(),
            database,
            table: table_parts,
            table_at: self.location(table_span),
            source: source_kind,
            key,
            key_at: self.location(key_spanned.span()),
            filter,
            updates,
            call,
            insert,
            http,
            exec,
            export,
            params,
            undo,
            depends_on: raw.depends_on.iter().map(|d| d.get_ref().clone()).collect(),
            checks,
            priority,
            categories,
            definition_sha256,
            approval_sha256,
            location: self.location(job_span),
            settings: raw.settings(),
        })
    }

    /// The given jobs and everything they depend on, dependencies first.
    /// A cycle is a spec error naming it.
    pub fn job_order(&self, wanted: Vec<String>) -> Result<Vec<String>> {
        let mut order = Vec::new();
        let mut state: HashMap<&str, u8> = HashMap::new(); // 1 visiting, 2 done
        fn visit<'a>(
            spec: &'a Spec,
            name: &'a str,
            state: &mut HashMap<&'a str, u8>,
            path: &mut Vec<&'a str>,
            order: &mut Vec<String>,
        ) -> Result<()> {
            match state.get(name) {
                Some(2) => return Ok(()),
                Some(1) => {
                    let start = path.iter().position(|p| *p == name).unwrap_or(0);
                    let mut cycle: Vec<&str> = path[start..].to_vec();
                    cycle.push(name);
                    let job = &spec.raw.jobs[name];
                    let at = job
                        .get_ref()
                        .depends_on
                        .iter()
                        .find(|d| d.get_ref() == cycle[1])
                        .map_or(job.span(), |d| d.span());
                    return Err(spec.err(
                        at,
                        format!("jobs.{name}.depends_on"),
                        format!("dependency cycle: {}", cycle.join(" -> ")),
                    ));
                }
                _ => {}
            }
            state.insert(name, 1);
            path.push(name);
            for dep in &spec.jobs[name].depends_on {
                visit(spec, dep, state, path, order)?;
            }
            path.pop();
            state.insert(name, 2);
            order.push(name.to_string());
            Ok(())
        }
        for w in &wanted {
            if !self.jobs.contains_key(w) {
                return Err(self.unknown_job(w));
            }
            let w: &str = self
                .jobs
                .get_key_value(w.as_str())
                .map(|(k, _)| k.as_str())
                .expect("checked");
            visit(self, w, &mut state, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    fn unknown_job(&self, name: &str) -> Error {
        Error::Usage(format!(
            "{}: no job named `{name}` (jobs: {})",
            self.path.display(),
            self.jobs.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
    }

    /// Picks the job to run: the one named, or the only one.
    pub fn pick_job(&self, name: Option<&str>) -> Result<&Job> {
        match name {
            Some(n) => self.jobs.get(n).ok_or_else(|| self.unknown_job(n)),
            None if self.jobs.len() == 1 => Ok(self.jobs.values().next().expect("one job")),
            None => Err(Error::Usage(format!(
                "{} has several jobs; choose one with --job ({})",
                self.path.display(),
                self.jobs.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Resolves a job for a run: environment, `${VAR}`s, params and settings.
    pub fn resolve(&self, job_name: &str, o: &Overrides) -> Result<ResolvedJob> {
        let job = self
            .jobs
            .get(job_name)
            .ok_or_else(|| self.unknown_job(job_name))?
            .clone();
        let env = self.env_table(o.env.as_deref())?;

        let mut redactor = Redactor::default();
        let mut lookup_db = None;
        let (url, source_db) = if job.outside() {
            // Rows are read from the job's database; state is kept apart.
            let source = match job.source.database(&job.database) {
                Some(name) => Some(self.named_url(&job, name, o.env.as_deref(), &mut redactor)?),
                None => None,
            };
            if matches!(job.source, Source::Diff { .. }) {
                lookup_db = Some(self.url_for(&job, o.env.as_deref(), &mut redactor)?);
            }
            (self.state_url(&job, o.env.as_deref(), &mut redactor)?, source)
        } else {
            let url = self.url_for(&job, o.env.as_deref(), &mut redactor)?;
            let source_db = match job.source.database(&job.database) {
                Some(name) if name != job.database => {
                    Some(self.named_url(&job, name, o.env.as_deref(), &mut redactor)?)
                }
                _ => None,
            };
            (url, source_db)
        };
        let http = self.http_target(&job, o.env.as_deref(), &mut redactor)?;

        // Params: command line, then defaults; every declared one must have a value.
        let mut params = BTreeMap::new();
        for (k, v) in &o.params {
            let decl = job.params.iter().find(|p| &p.name == k).ok_or_else(|| {
                Error::Usage(format!(
                    "job `{}` has no param `{k}` (declared: {})",
                    job.name,
                    if job.params.is_empty() {
                        "none".into()
                    } else {
                        job.params.iter().map(|p| p.name.clone()).collect::<Vec<_>>().join(", ")
                    }
                ))
            })?;
            let value = decl
                .kind
                .value(v)
                .map_err(|m| Error::Usage(format!("--param {k}: {m}")))?;
            if decl.kind == ParamKind::Secret {
                redactor.add(v.clone());
            }
            params.insert(k.clone(), value);
        }
        for decl in &job.params {
            if params.contains_key(&decl.name) {
                continue;
            }
            match &decl.default {
                Some(d) => {
                    params.insert(decl.name.clone(), decl.kind.value(d).expect("validated at load"));
                }
                None => {
                    return Err(Error::Usage(format!(
                        "job `{}` needs --param {}=<{}> (declared at {})",
                        job.name,
                        decl.name,
                        serde_json::to_value(decl.kind)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default(),
                        decl.location
                    )));
                }
            }
        }

        let mut layers = vec![self.raw.defaults.settings()];
        if let Some(e) = env {
            layers.push(e.settings());
        }
        layers.push(job.settings.clone());
        let mut settings = Settings::resolve(&layers, o)?;
        settings.pause_file = settings.pause_file.map(|p| self.dir.join(p));
        let mut probe_dbs = BTreeMap::new();
        for name in settings.probes.iter().filter_map(|p| p.database.as_ref()) {
            if !probe_dbs.contains_key(name) {
                probe_dbs.insert(
                    name.clone(),
                    self.named_url(&job, name, o.env.as_deref(), &mut redactor)?,
                );
            }
        }
        let approval = self.approval_policy(env);
        let log_dir = env
            .and_then(|e| e.log_dir.as_ref())
            .or(self.raw.defaults.log_dir.as_ref())
            .map(|d| self.dir.join(d.get_ref()))
            .unwrap_or_else(|| self.dir.join("infill_logs"));
        Ok(ResolvedJob {
            job,
            target: url,
            source_db,
            http,
            lookup_db,
            probe_dbs,
            env: o.env.clone(),
            params,
            settings,
            command_line: o.live_settings(),
            approval,
            log_dir,
            redactor,
        })
    }

    /// The URL of the database a job writes to, `${VAR}`s expanded.
    pub fn target_url(&self, job_name: &str, env: Option<&str>) -> Result<DatabaseUrl> {
        let job = self.jobs.get(job_name).ok_or_else(|| self.unknown_job(job_name))?;
        if job.outside() {
            return self.state_url(job, env, &mut Redactor::default());
        }
        self.url_for(job, env, &mut Redactor::default())
    }

    fn env_table(&self, env: Option<&str>) -> Result<Option<&raw::RawEnv>> {
        match env {
            None => Ok(None),
            Some(e) => self.raw.env.get(e).map(|t| Some(t.get_ref())).ok_or_else(|| {
                Error::Usage(format!(
                    "{}: no environment `{e}` (environments: {})",
                    self.path.display(),
                    if self.raw.env.is_empty() {
                        "none".to_string()
                    } else {
                        self.raw.env.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ))
            }),
        }
    }

    fn url_for(&self, job: &Job, env_name: Option<&str>, redactor: &mut Redactor) -> Result<DatabaseUrl> {
        self.named_url(job, &job.database, env_name, redactor)
    }

    /// The URL of the named database `database`, for `job`'s errors.
    fn named_url(
        &self,
        job: &Job,
        database: &str,
        env_name: Option<&str>,
        redactor: &mut Redactor,
    ) -> Result<DatabaseUrl> {
        let env = self.env_table(env_name)?;
        let env_label = env_name.unwrap_or("");
        let (dotenv, dotenv_path) = self.load_dotenv(env_name)?;
        let (field, value) = env
            .and_then(|e| {
                e.databases
                    .get(database)
                    .map(|v| (format!("env.{env_label}.databases.{database}"), v))
            })
            .or_else(|| {
                self.raw
                    .databases
                    .get(database)
                    .map(|v| (format!("databases.{database}"), v))
            })
            .ok_or_else(|| {
                let raw = self.raw.jobs[&job.name].get_ref();
                let src = raw.source.as_ref().map(|s| s.get_ref());
                let (at, field) = if database == job.database {
                    (raw.database.as_ref().map(|d| d.span()), "database")
                } else if let Some(d) = src.and_then(|s| s.diff.as_ref()) {
                    (Some(d.get_ref().from.span()), "source.diff.from")
                } else {
                    (
                        src.and_then(|s| s.database.as_ref()).map(|d| d.span()),
                        "source.database",
                    )
                };
                self.err(
                    at.unwrap_or_else(|| self.raw.jobs[&job.name].span()),
                    format!("jobs.{}.{field}", job.name),
                    format!("no database named `{database}` in [databases]; add {database} = \"<url>\""),
                )
            })?;
        let url = expand_vars(value.get_ref(), &dotenv, redactor).map_err(|var| {
            self.err(
                value.span(),
                field.clone(),
                format!(
                    "${{{var}}} is not set (set it in the environment or in {})",
                    dotenv_path.display()
                ),
            )
        })?;
        let url = self.normalise_sqlite_url(&url);
        redactor.add_url(&url);
        Ok(DatabaseUrl {
            name: database.to_string(),
            url,
        })
    }

    /// Variables of the dotenv file (the environment's `dotenv`, else
    /// `.env` if present), and its path.
    fn load_dotenv(&self, env_name: Option<&str>) -> Result<(HashMap<String, String>, PathBuf)> {
        let env = self.env_table(env_name)?;
        let env_label = env_name.unwrap_or("");
        let dotenv_setting = env.and_then(|e| e.dotenv.as_ref());
        let dotenv_path = self
            .dir
            .join(dotenv_setting.map(|d| d.get_ref().as_str()).unwrap_or(".env"));
        let mut dotenv = HashMap::new();
        if dotenv_path.exists() {
            let iter = dotenvy::from_path_iter(&dotenv_path)
                .map_err(|e| Error::Usage(format!("cannot read {}: {e}", dotenv_path.display())))?;
            for item in iter {
                let (k, v) = item.map_err(|e| Error::Usage(format!("{}: {e}", dotenv_path.display())))?;
                dotenv.insert(k, v);
            }
        } else if let Some(d) = dotenv_setting {
            return Err(self.err(
                d.span(),
                format!("env.{env_label}.dotenv"),
                format!("{} does not exist", dotenv_path.display()),
            ));
        }
        Ok((dotenv, dotenv_path))
    }

    /// `action.http`'s URL and headers, `${VAR}`s expanded.
    fn http_target(&self, job: &Job, env_name: Option<&str>, redactor: &mut Redactor) -> Result<Option<HttpTarget>> {
        let Some(h) = &job.http else { return Ok(None) };
        let (dotenv, dotenv_path) = self.load_dotenv(env_name)?;
        let expand = |text: &str, field: String, redactor: &mut Redactor| {
            expand_vars(text, &dotenv, redactor).map_err(|var| Error::Spec {
                location: h.location.clone(),
                field,
                message: format!(
                    "${{{var}}} is not set (set it in the environment or in {})",
                    dotenv_path.display()
                ),
            })
        };
        let url = expand(&h.url, format!("jobs.{}.action.http.url", job.name), redactor)?;
        // The URL itself is no secret unless a variable or a password is in it.
        redactor.add_url(&url);
        let mut headers = Vec::new();
        for (k, v) in &h.headers {
            headers.push((
                k.clone(),
                expand(v, format!("jobs.{}.action.http.headers.{k}", job.name), redactor)?,
            ));
        }
        Ok(Some(HttpTarget { url, headers }))
    }

    /// Where a job whose action writes no database keeps its state: the
    /// database `[defaults] state` names, else `.infill/state.db` by the spec.
    fn state_url(&self, job: &Job, env_name: Option<&str>, redactor: &mut Redactor) -> Result<DatabaseUrl> {
        match &self.raw.defaults.state {
            Some(name) => self.named_url(job, name.get_ref(), env_name, redactor),
            None => {
                let dir = self.dir.join(".infill");
                std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
                    path: dir.clone(),
                    source: e,
                })?;
                let path = dir.join("state.db");
                let path = std::path::absolute(&path).unwrap_or(path);
                Ok(DatabaseUrl {
                    name: "state".into(),
                    url: format!("sqlite://{}?mode=rwc", path.display()),
                })
            }
        }
    }

    /// SQLite paths in a spec are relative to the spec's folder.
    fn normalise_sqlite_url(&self, url: &str) -> String {
        let Some(rest) = url.strip_prefix("sqlite:") else {
            return url.to_string();
        };
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        if rest.starts_with(":memory:") || rest.starts_with('/') {
            return format!("sqlite://{rest}");
        }
        let (path, query) = rest.split_once('?').map(|(p, q)| (p, Some(q))).unwrap_or((rest, None));
        let abs = std::path::absolute(self.dir.join(path)).unwrap_or_else(|_| self.dir.join(path));
        match query {
            Some(q) => format!("sqlite://{}?{q}", abs.display()),
            None => format!("sqlite://{}", abs.display()),
        }
    }
}

/// Expands `${NAME}` from the process environment, then the dotenv map.
/// Expanded values are registered as secrets. Returns the first undefined name.
fn expand_vars(
    text: &str,
    dotenv: &HashMap<String, String>,
    redactor: &mut Redactor,
) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        let value = std::env::var(name)
            .ok()
            .or_else(|| dotenv.get(name).cloned())
            .ok_or_else(|| name.to_string())?;
        redactor.add_url(&value);
        if !value.contains("://") {
            redactor.add(value.clone());
        }
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A TOML value as text, for messages and param defaults.
fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn location_of(file: &Path, text: &str, offset: usize) -> Location {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    Location {
        file: file.to_path_buf(),
        line,
        column,
    }
}

/// The dotted field a byte offset falls in: the nearest table header above
/// it plus the key on its line (`jobs.fill.source.table`).
fn field_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let header = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        });
    if line.starts_with('[') {
        return line
            .trim_start_matches('[')
            .split(']')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
    }
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string());
    match (header, key) {
        (Some(h), Some(k)) if !h.is_empty() => format!("{h}.{k}"),
        (_, Some(k)) => k,
        (Some(h), None) => h,
        (None, None) => "(top level)".into(),
    }
}

#[cfg(test)]
mod tests;
