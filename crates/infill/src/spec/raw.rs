//! The spec as written: serde structs that mirror the TOML, with spans kept
//! on every leaf that validation may need to point at. Nothing here is
//! trusted; `super::validate` turns it into typed jobs.
//!
//! Fields that only later features read (approvals, checks) are parsed now,
//! so a spec written for them is accepted and validated today.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// Declares a struct holding the throttle and batch keys that may stand in
/// `[defaults]`, `[env.E]` and `[jobs.J]`, plus the struct's own fields.
macro_rules! with_settings {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        pub struct $name {
            pub rate: Option<Spanned<String>>,
            pub concurrency: Option<Spanned<i64>>,
            pub batch_time: Option<Spanned<String>>,
            pub batch_size: Option<Spanned<i64>>,
            pub min_batch: Option<Spanned<i64>>,
            pub max_batch: Option<Spanned<i64>>,
            pub max_failures: Option<Spanned<toml::Value>>,
            pub pause_between: Option<Spanned<String>>,
            pub sleep_coef: Option<Spanned<f64>>,
            pub busy_sleep_coef: Option<Spanned<f64>>,
            pub lock_timeout: Option<Spanned<String>>,
            pub statement_timeout: Option<Spanned<String>>,
            pub pause_file: Option<Spanned<String>>,
            #[serde(default)]
            pub probes: BTreeMap<String, Spanned<RawProbe>>,
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            /// The throttle and batch keys of this table.
            pub fn settings(&self) -> RawSettings {
                RawSettings {
                    rate: self.rate.clone(),
                    concurrency: self.concurrency.clone(),
                    batch_time: self.batch_time.clone(),
                    batch_size: self.batch_size.clone(),
                    min_batch: self.min_batch.clone(),
                    max_batch: self.max_batch.clone(),
                    max_failures: self.max_failures.clone(),
                    pause_between: self.pause_between.clone(),
                    sleep_coef: self.sleep_coef.clone(),
                    busy_sleep_coef: self.busy_sleep_coef.clone(),
                    lock_timeout: self.lock_timeout.clone(),
                    statement_timeout: self.statement_timeout.clone(),
                    pause_file: self.pause_file.clone(),
                    probes: self.probes.clone(),
                }
            }
        }
    };
}

with_settings! {
    /// The throttle and batch keys alone.
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RawSettings {}
}

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    #[serde(default)]
    pub databases: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, Spanned<RawEnv>>,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub jobs: BTreeMap<String, Spanned<RawJob>>,
}

with_settings! {
    /// `[defaults]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RawDefaults {
        pub require_approval: Option<Spanned<bool>>,
        pub approval_ttl: Option<Spanned<String>>,
        pub approver_must_differ: Option<Spanned<bool>>,
        pub drift: Option<Spanned<toml::Value>>,
        pub log_dir: Option<Spanned<String>>,
        pub state: Option<Spanned<String>>,
    }
}

with_settings! {
    /// `[env.NAME]`: overrides `[databases]` and `[defaults]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RawEnv {
        #[serde(default)]
        pub databases: BTreeMap<String, Spanned<String>>,
        pub dotenv: Option<Spanned<String>>,
        pub require_approval: Option<Spanned<bool>>,
        pub approval_ttl: Option<Spanned<String>>,
        pub approver_must_differ: Option<Spanned<bool>>,
        pub drift: Option<Spanned<toml::Value>>,
        pub log_dir: Option<Spanned<String>>,
    }
}

with_settings! {
    /// `[jobs.NAME]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RawJob {
        pub description: Option<String>,
        pub database: Option<Spanned<String>>,
        pub source: Option<Spanned<RawSource>>,
        pub action: Option<Spanned<RawAction>>,
        #[serde(default)]
        pub params: BTreeMap<String, Spanned<RawParam>>,
        #[serde(default)]
        pub categories: BTreeMap<String, Spanned<String>>,
        #[serde(default)]
        pub priority: Vec<Spanned<String>>,
        #[serde(default)]
        pub checks: Vec<Spanned<RawCheck>>,
        #[serde(default)]
        pub depends_on: Vec<Spanned<String>>,
        pub undo: Option<Spanned<bool>>,
    }
}

/// `source.*`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub table: Option<Spanned<String>>,
    pub key: Option<Spanned<StringOrList>>,
    #[serde(rename = "where")]
    pub where_: Option<Spanned<String>>,
    pub query: Option<Spanned<String>>,
    /// The named database `query` reads (default: the job's own).
    pub database: Option<Spanned<String>>,
    pub diff: Option<Spanned<RawDiff>>,
    pub file: Option<Spanned<RawFile>>,
}

/// `source.diff = { from, query, key, missing_in }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiff {
    pub from: Spanned<String>,
    pub query: Spanned<String>,
    pub key: Option<Spanned<StringOrList>>,
    pub missing_in: Spanned<String>,
}

/// `source.file = "rows.csv"` or `{ path = "...", format = "csv" | "jsonl" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawFile {
    Path(String),
    Table { path: String, format: Option<String> },
}

/// `source.key = "id"` or `["tenant_id", "id"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

/// `action.*`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    pub table: Option<Spanned<String>>,
    pub update: Option<BTreeMap<String, Spanned<String>>>,
    pub insert: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    pub call: Option<Spanned<String>>,
    pub http: Option<Spanned<RawHttp>>,
    pub exec: Option<Spanned<RawExec>>,
    pub export: Option<Spanned<RawExport>>,
}

/// `action.exec.*`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExec {
    /// The program and its arguments (no shell).
    pub command: Spanned<Vec<String>>,
    /// What the command reads on stdin: an inline template or a template
    /// file (default: the row as JSON).
    pub stdin: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    /// Variables of infill's environment passed on (besides PATH).
    #[serde(default)]
    pub env: Vec<String>,
}

/// `action.export.*`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExport {
    /// The file written: `.json` (one array) or `.jsonl` (a line per row).
    pub path: Spanned<String>,
    /// Each row through a template (inline or a file); default: the row.
    pub template: Option<Spanned<String>>,
}

/// `action.http.*`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub url: Spanned<String>,
    pub method: Option<String>,
    /// An inline template, or the path of a template file.
    pub body: Option<Spanned<String>>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub timeout: Option<Spanned<String>>,
    pub max_attempts: Option<Spanned<i64>>,
    pub idempotency_header: Option<String>,
}

/// `params.NAME = { type = "int", default = 7 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParam {
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    pub default: Option<Spanned<toml::Value>>,
    pub description: Option<String>,
}

/// `probes.NAME = { sql = "...", pause_above = 10, abort_above = 100 }`;
/// a built-in probe (`replica_lag`, `oldest_transaction`, `threads_running`)
/// needs no `sql`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    pub sql: Option<String>,
    /// A name of `[databases]` where the probe runs (a replica), instead
    /// of the job's target.
    pub database: Option<String>,
    pub pause_above: Option<toml::Value>,
    pub abort_above: Option<toml::Value>,
}

/// `[[jobs.NAME.checks]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    pub name: Spanned<String>,
    pub sql: Spanned<String>,
    pub expect: Spanned<toml::Value>,
}
