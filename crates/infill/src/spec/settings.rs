//! Throttle and batch settings: parsed where they are written (so a bad
//! value names its field), then layered defaults < environment < job <
//! command line.

use std::ops::Range;
use std::time::Duration;

use serde::Serialize;

use super::Overrides;
use super::raw::RawSettings;
use crate::error::{Error, Result};

/// A rate limit in units per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
}

impl Rate {
    /// Parses `500/s`, `20/min`, `1000/h`.
    pub fn parse(s: &str) -> std::result::Result<Rate, String> {
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a rate (write it as 500/s or 20/min)"))?;
        let n: f64 = n.trim().parse().map_err(|_| format!("`{s}`: `{n}` is not a number"))?;
        let secs = match unit.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            u => return Err(format!("`{s}`: unknown unit `{u}` (use s, min or h)")),
        };
        if n <= 0.0 || !n.is_finite() {
            return Err(format!("`{s}`: the rate must be positive"));
        }
        Ok(Rate { per_second: n / secs })
    }
}

/// How many rows may fail before a run stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxFailures {
    Count(u64),
    Ratio(f64),
}

/// Parses `500ms`, `2s`, `1.5s`, `10m`, `24h`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (write it as 500ms, 2s, 10m or 24h)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" if !unit.is_empty() || n == 0.0 => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}` is not a duration (write it as 500ms, 2s, 10m or 24h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// The default `max_batch` where the engine writes and images a batch on
/// its own (no row travels to infill, so memory does not grow with it).
/// On PostgreSQL such a batch takes about as long as one of 20,000 keys did
/// when its rows came back to infill (about 165 ms on the benchmark
/// table); on MariaDB about 410 ms. `batch_time` still shortens a batch
/// that takes longer.
pub const ENGINE_MAX_BATCH: u64 = 50_000;

/// The default `busy_sleep_coef`: while the application is busy, a run
/// rests twice as long as each batch took, so the application has two
/// thirds of the time to itself. On the benchmark's two cores, pgbench's
/// p99 latency was 1.7x its p99 alone at this coefficient and 2.4x to 2.9x
/// without a rest (docs/BENCHMARKS.md, B3).
pub const DEFAULT_BUSY_SLEEP_COEF: f64 = 2.0;

/// The resolved settings of one job run.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The first batch's size (and every batch's, when fixed).
    pub batch_size: u64,
    /// True when `--batch-size` fixed the size: no adaptation.
    pub fixed_batch: bool,
    /// Adaptive batches aim at this duration.
    pub batch_time: Duration,
    pub min_batch: u64,
    pub max_batch: u64,
    /// True when neither `max_batch` nor a `batch_size` above it was given:
    /// the run may then allow [`ENGINE_MAX_BATCH`] where the engine writes
    /// and images a batch on its own.
    pub max_batch_default: bool,
    pub rate: Option<Rate>,
    pub pause_between: Duration,
    pub sleep_coef: f64,
    /// The `sleep_coef` used instead (when larger) after a batch during
    /// which other sessions of the application were busy: a run yields to
    /// an application at work and goes at full speed on a quiet database.
    pub busy_sleep_coef: f64,
    pub max_failures: MaxFailures,
    pub concurrency: u64,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    /// While this file exists, the run holds between batches (gh-ost's
    /// throttle flag file). Relative to the spec's folder.
    pub pause_file: Option<std::path::PathBuf>,
    /// Health probes, checked between batches.
    pub probes: Vec<Probe>,
}

/// A health probe: a query returning one number, and the levels above
/// which the run holds (`pause_above`) or stops (`abort_above`).
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub name: String,
    /// None for a built-in probe (see `Dialect::builtin_probe`).
    pub sql: Option<String>,
    /// The `[databases]` name it runs on; None: the job's target.
    pub database: Option<String>,
    pub pause_above: Option<f64>,
    pub abort_above: Option<f64>,
}

/// The probes infill knows without `sql` (where the engine has them).
pub const BUILTIN_PROBES: &[&str] = &["replica_lag", "oldest_transaction", "threads_running"];

/// How far the candidate count may move between a plan's approval and the
/// run: `drift = 50` (rows) or `drift = "2%"` (of the approved count).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Drift {
    Rows(u64),
    Percent(f64),
}

impl Drift {
    pub(super) fn parse(v: &toml::Value) -> std::result::Result<Drift, String> {
        let bad = || {
            format!(
                "`{}`: write a row count (50) or a percentage (\"2%\")",
                super::toml_text(v)
            )
        };
        match v {
            toml::Value::Integer(n) if *n >= 0 => Ok(Drift::Rows(*n as u64)),
            toml::Value::String(s) => {
                let t = s.trim();
                match t.strip_suffix('%') {
                    Some(p) => p
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|p| *p >= 0.0 && p.is_finite())
                        .map(Drift::Percent)
                        .ok_or_else(bad),
                    None => t.parse::<u64>().map(Drift::Rows).map_err(|_| bad()),
                }
            }
            _ => Err(bad()),
        }
    }

    /// The largest change allowed from `approved` rows.
    pub fn allowance(self, approved: u64) -> u64 {
        match self {
            Drift::Rows(n) => n,
            Drift::Percent(p) => (approved as f64 * p / 100.0).floor() as u64,
        }
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Rows(n) => write!(f, "{n} rows"),
            Drift::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What `require_approval = true` asks of a run (see `approval`).
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalPolicy {
    /// Approvals older than this no longer count.
    pub ttl: Option<Duration>,
    /// The approver may not be the one who runs.
    pub approver_must_differ: bool,
    /// Allowed change of the candidate count since the approval (default: none).
    pub drift: Drift,
}

type ErrFn<'a> = &'a dyn Fn(Range<usize>, String, String) -> Error;

impl Settings {
    /// Checks every key of one table, naming the field on error.
    pub(super) fn check(raw: &RawSettings, prefix: &str, err: ErrFn) -> Result<()> {
        let f = |k: &str| format!("{prefix}.{k}");
        if let Some(r) = &raw.rate {
            Rate::parse(r.get_ref()).map_err(|m| err(r.span(), f("rate"), m))?;
        }
        for (name, d) in [
            ("batch_time", &raw.batch_time),
            ("pause_between", &raw.pause_between),
            ("lock_timeout", &raw.lock_timeout),
            ("statement_timeout", &raw.statement_timeout),
        ] {
            if let Some(d) = d {
                parse_duration(d.get_ref()).map_err(|m| err(d.span(), f(name), m))?;
            }
        }
        for (name, n) in [
            ("batch_size", &raw.batch_size),
            ("min_batch", &raw.min_batch),
            ("max_batch", &raw.max_batch),
            ("concurrency", &raw.concurrency),
        ] {
            if let Some(n) = n
                && *n.get_ref() < 1
            {
                return Err(err(
                    n.span(),
                    f(name),
                    format!("must be at least 1, not {}", n.get_ref()),
                ));
            }
        }
        for (name, c) in [
            ("sleep_coef", &raw.sleep_coef),
            ("busy_sleep_coef", &raw.busy_sleep_coef),
        ] {
            if let Some(c) = c
                && !(*c.get_ref() >= 0.0 && c.get_ref().is_finite())
            {
                return Err(err(c.span(), f(name), "must be a number, 0 or more".into()));
            }
        }
        if let Some(m) = &raw.max_failures {
            parse_max_failures(m.get_ref()).map_err(|msg| err(m.span(), f("max_failures"), msg))?;
        }
        for (name, p) in &raw.probes {
            probe(name, p.get_ref()).map_err(|m| err(p.span(), f(&format!("probes.{name}")), m))?;
        }
        Ok(())
    }

    /// Layers settings (lowest precedence first), then the command line.
    pub(super) fn resolve(layers: &[RawSettings], o: &Overrides) -> Result<Settings> {
        macro_rules! last {
            ($field:ident) => {
                layers
                    .iter()
                    .rev()
                    .find_map(|l| l.$field.as_ref().map(|v| v.get_ref().clone()))
            };
        }
        let dur = |v: Option<String>, default: Duration| {
            v.map(|s| parse_duration(&s).expect("checked at load"))
                .unwrap_or(default)
        };
        let rate = match &o.rate {
            Some(r) if r == "none" || r == "off" => None,
            Some(r) => Some(Rate::parse(r).map_err(|m| Error::Usage(format!("--rate: {m}")))?),
            None => last!(rate).map(|r| Rate::parse(&r).expect("checked at load")),
        };
        // An explicit batch_size outside the default bounds moves them: a
        // spec asking for batches of 20 means 20, not the default minimum.
        let first = last!(batch_size).map(|n| n as u64);
        let min_batch = last!(min_batch)
            .map(|n| n as u64)
            .unwrap_or_else(|| first.map_or(100, |f| f.min(100)));
        let max_batch_default = last!(max_batch).is_none() && first.is_none_or(|f| f <= 20_000);
        let max_batch = last!(max_batch)
            .map(|n| n as u64)
            .unwrap_or_else(|| first.map_or(20_000, |f| f.max(20_000)));
        if min_batch > max_batch {
            return Err(Error::Usage(format!(
                "min_batch ({min_batch}) is larger than max_batch ({max_batch})"
            )));
        }
        let batch_size = match o.batch_size {
            Some(0) => return Err(Error::Usage("--batch-size must be at least 1".into())),
            Some(n) => n as u64,
            None => first.unwrap_or(1000).clamp(min_batch, max_batch),
        };
        Ok(Settings {
            batch_size,
            fixed_batch: o.batch_size.is_some(),
            batch_time: dur(last!(batch_time), Duration::from_millis(500)),
            min_batch,
            max_batch,
            max_batch_default,
            rate,
            pause_between: dur(last!(pause_between), Duration::ZERO),
            sleep_coef: last!(sleep_coef).unwrap_or(0.0),
            busy_sleep_coef: last!(busy_sleep_coef).unwrap_or(DEFAULT_BUSY_SLEEP_COEF),
            max_failures: last!(max_failures)
                .map(|m| parse_max_failures(&m).expect("checked at load"))
                .unwrap_or(MaxFailures::Count(0)),
            concurrency: o.concurrency.unwrap_or_else(|| last!(concurrency).unwrap_or(1) as u64),
            lock_timeout: dur(last!(lock_timeout), Duration::from_secs(2)),
            statement_timeout: dur(last!(statement_timeout), Duration::from_secs(30)),
            pause_file: last!(pause_file).map(std::path::PathBuf::from),
            probes: {
                // By name: a later layer's probe replaces an earlier one.
                let mut by_name = std::collections::BTreeMap::new();
                for l in layers {
                    for (name, p) in &l.probes {
                        by_name.insert(name.clone(), probe(name, p.get_ref()).expect("checked at load"));
                    }
                }
                by_name.into_values().collect()
            },
        })
    }
}

impl Settings {
    /// The keys `infill set RUN key=value` may change while a run goes.
    pub const LIVE_KEYS: &'static [&'static str] = &[
        "rate",
        "batch_time",
        "batch_size",
        "pause_between",
        "sleep_coef",
        "busy_sleep_coef",
        "max_failures",
        "concurrency",
    ];

    /// Settings with the defaults, to check `infill set` values against.
    pub fn default_for_checks() -> Settings {
        Settings::resolve(&[RawSettings::default()], &Overrides::default()).expect("the defaults resolve")
    }

    /// These settings with `infill set` pairs applied over them, and the
    /// pairs refused (each with why).
    pub fn with_pairs<'a>(&self, pairs: impl IntoIterator<Item = (&'a String, &'a String)>) -> (Settings, Vec<String>) {
        let mut s = self.clone();
        let mut rejected = Vec::new();
        for (k, v) in pairs {
            if let Err(m) = s.apply(k, v) {
                rejected.push(format!("{k}: {m}"));
            }
        }
        (s, rejected)
    }

    /// Applies one `infill set` change; the message says what is wrong.
    pub fn apply(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        let v = value.trim();
        match key {
            "rate" if v == "none" || v == "off" => self.rate = None,
            "rate" => self.rate = Some(Rate::parse(v)?),
            "batch_time" => self.batch_time = parse_duration(v)?,
            "pause_between" => self.pause_between = parse_duration(v)?,
            "sleep_coef" | "busy_sleep_coef" => {
                let c = v
                    .parse::<f64>()
                    .ok()
                    .filter(|c| *c >= 0.0 && c.is_finite())
                    .ok_or_else(|| format!("`{v}` is not a non-negative number"))?;
                if key == "sleep_coef" {
                    self.sleep_coef = c;
                } else {
                    self.busy_sleep_coef = c;
                }
            }
            "batch_size" => {
                let n: u64 = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| format!("`{v}` is not a positive whole number"))?;
                self.batch_size = n;
                self.fixed_batch = true;
                self.min_batch = self.min_batch.min(n);
                self.max_batch = self.max_batch.max(n);
            }
            "concurrency" => {
                self.concurrency = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| format!("`{v}` is not a positive whole number"))?;
            }
            "max_failures" => {
                let t: toml::Value = v
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .unwrap_or_else(|_| toml::Value::String(v.to_string()));
                self.max_failures = parse_max_failures(&t)?;
            }
            other => {
                return Err(format!(
                    "`{other}` cannot be set on a live run (keys: {})",
                    Settings::LIVE_KEYS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

fn probe(name: &str, raw: &super::raw::RawProbe) -> std::result::Result<Probe, String> {
    let level = |v: &Option<toml::Value>, key: &str| match v {
        None => Ok(None),
        Some(toml::Value::Integer(i)) => Ok(Some(*i as f64)),
        Some(toml::Value::Float(f)) => Ok(Some(*f)),
        Some(other) => Err(format!("{key} must be a number, not {}", super::toml_text(other))),
    };
    let p = Probe {
        name: name.to_string(),
        sql: raw.sql.clone(),
        database: raw.database.clone(),
        pause_above: level(&raw.pause_above, "pause_above")?,
        abort_above: level(&raw.abort_above, "abort_above")?,
    };
    if p.sql.is_none() && !BUILTIN_PROBES.contains(&name) {
        return Err(format!(
            "give sql = \"SELECT ...\" (a query returning one number), or use a built-in probe: {}",
            BUILTIN_PROBES.join(", ")
        ));
    }
    if p.pause_above.is_none() && p.abort_above.is_none() {
        return Err("give pause_above, abort_above or both".into());
    }
    Ok(p)
}

fn parse_max_failures(v: &toml::Value) -> std::result::Result<MaxFailures, String> {
    match v {
        toml::Value::Integer(n) if *n >= 0 => Ok(MaxFailures::Count(*n as u64)),
        toml::Value::String(s) if s.trim_end().ends_with('%') => {
            let n: f64 = s
                .trim()
                .trim_end_matches('%')
                .parse()
                .map_err(|_| format!("`{s}` is not a percentage"))?;
            Ok(MaxFailures::Ratio(n / 100.0))
        }
        toml::Value::Float(f) if (0.0..1.0).contains(f) => Ok(MaxFailures::Ratio(*f)),
        other => Err(format!(
            "`{}`: write a count (10) or a percentage (\"0.1%\")",
            super::toml_text(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_batch_size_moves_the_default_bounds() {
        let layer = |text: &str| -> RawSettings { toml::from_str(text).unwrap() };
        let s = Settings::resolve(&[layer("batch_size = 20")], &Overrides::default()).unwrap();
        assert_eq!((s.batch_size, s.min_batch, s.max_batch), (20, 20, 20_000));
        let s = Settings::resolve(&[layer("batch_size = 50000")], &Overrides::default()).unwrap();
        assert_eq!((s.batch_size, s.min_batch, s.max_batch), (50_000, 100, 50_000));
        let s = Settings::resolve(&[layer("batch_size = 20\nmin_batch = 100")], &Overrides::default()).unwrap();
        assert_eq!(s.batch_size, 100, "explicit bounds still clamp");
        let s = Settings::resolve(&[layer("")], &Overrides::default()).unwrap();
        assert_eq!((s.batch_size, s.min_batch, s.max_batch), (1000, 100, 20_000));
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("12").is_err());
        assert_eq!(Rate::parse("20/min").unwrap().per_second, 20.0 / 60.0);
        assert_eq!(Rate::parse("500/s").unwrap().per_second, 500.0);
        assert!(Rate::parse("fast").is_err());
        assert!(Rate::parse("0/s").is_err());
    }

    /// The command line's values, kept as `infill set` pairs and applied
    /// over the spec's on resume, mean what they meant on the command line.
    #[test]
    fn command_line_values_kept_as_pairs_mean_the_same() {
        let layer: RawSettings = toml::from_str("rate = \"5/s\"\nconcurrency = 1").unwrap();
        let given = Overrides {
            rate: Some("20/min".into()),
            batch_size: Some(7),
            concurrency: Some(3),
            ..Default::default()
        };
        let direct = Settings::resolve(std::slice::from_ref(&layer), &given).unwrap();
        let mut kept = Settings::resolve(std::slice::from_ref(&layer), &Overrides::default()).unwrap();
        for (k, v) in &given.live_settings() {
            kept.apply(k, v).unwrap();
        }
        for s in [&direct, &kept] {
            assert_eq!(s.rate.as_ref().map(|r| r.per_second), Some(20.0 / 60.0));
            assert_eq!((s.batch_size, s.fixed_batch, s.concurrency), (7, true, 3));
        }
        // `--rate none` lifts the spec's rate, directly or kept.
        let none = Overrides {
            rate: Some("none".into()),
            ..Default::default()
        };
        let s = Settings::resolve(std::slice::from_ref(&layer), &none).unwrap();
        assert!(s.rate.is_none());
        let mut kept = Settings::resolve(std::slice::from_ref(&layer), &Overrides::default()).unwrap();
        kept.apply("rate", &none.live_settings()["rate"]).unwrap();
        assert!(kept.rate.is_none());
    }
}
