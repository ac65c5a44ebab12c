//! `action.http`: a JSON event per row, rendered from a minijinja template
//! and sent to an endpoint (seed 004's webhook replay). Delivery is at least
//! once: a record counts as delivered only after a 2xx, and every request
//! carries an `Idempotency-Key` derived from the job and the record's key,
//! the same on every attempt and every run, so a receiver can drop the
//! duplicates a crash may cause.
//!
//! Templates escape every value as JSON (`{{ row.name }}` renders a quoted,
//! escaped string) and refuse undefined names, so a typo fails at plan or
//! dry run naming the template line instead of sending `null`s.
//!
//! Which failures are worth another attempt is decided here, from the
//! status alone: connection errors, timeouts, 408, 425, 429 and 5xx wait
//! (`Retry-After` when the receiver gives it, else exponential backoff with
//! jitter) and try again up to `max_attempts`; any other status is final.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::spec::{HttpSpec, Location, TemplateText};
use crate::value::Value;

/// The body when a spec gives none: the row as a JSON object.
const DEFAULT_BODY: &str = "{{ row | tojson }}";

/// The longest wait a `Retry-After` may ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How much of a failed response's body is kept in the dead letter.
const EXCERPT: usize = 300;

/// A compiled body template.
pub struct Renderer {
    env: minijinja::Environment<'static>,
    name: String,
    location: Location,
    field: String,
}

/// A request as it would be sent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rendered {
    pub method: String,
    pub url: String,
    /// Header values with secrets masked when shown.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Renderer {
    /// Compiles a template (`None`: the row as JSON); a syntax error names
    /// the template line and `field`, the spec field it came from.
    pub fn new(template: Option<&TemplateText>, location: &Location, field: String) -> Result<Renderer> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::Json);
        let (name, text) = match template {
            Some(b) => (b.name.clone(), b.text.clone()),
            None => ("body".to_string(), DEFAULT_BODY.to_string()),
        };
        env.add_template_owned(name.clone(), text).map_err(|e| Error::Spec {
            location: location.clone(),
            field: field.clone(),
            message: template_message(&name, &e),
        })?;
        Ok(Renderer {
            env,
            name,
            location: location.clone(),
            field,
        })
    }

    /// The renderer of a job's template: the http body, the exec stdin or
    /// the export template (None for other actions).
    pub fn of_job(job: &crate::spec::Job) -> Result<Option<Renderer>> {
        let field = |f: &str| format!("jobs.{}.action.{f}", job.name);
        Ok(match (&job.http, &job.exec, &job.export) {
            (Some(h), _, _) => Some(Renderer::new(h.body.as_ref(), &h.location, field("http.body"))?),
            (_, Some(e), _) => Some(Renderer::new(e.stdin.as_ref(), &e.location, field("exec.stdin"))?),
            (_, _, Some(x)) => Some(Renderer::new(
                x.template.as_ref(),
                &x.location,
                field("export.template"),
            )?),
            _ => None,
        })
    }

    /// The fields of the row the template names (`row.x`), or None when it
    /// uses the whole row (`row | tojson`).
    pub fn wanted(&self) -> Option<Vec<String>> {
        let t = self.env.get_template(&self.name).expect("added");
        let vars = t.undeclared_variables(true);
        let mut out = Vec::new();
        for v in &vars {
            match v.strip_prefix("row.") {
                Some(field) => {
                    let field = field.split('.').next().unwrap_or(field).to_string();
                    if !out.contains(&field) {
                        out.push(field);
                    }
                }
                None if v == "row" => return None,
                None => {}
            }
        }
        out.sort();
        Some(out)
    }

    /// Renders the body for one row.
    pub fn render(&self, row: &serde_json::Value, params: &serde_json::Value, key: &str) -> Result<String> {
        let t = self.env.get_template(&self.name).expect("added");
        t.render(minijinja::context! { row => row, params => params, idempotency_key => key })
            .map_err(|e| Error::Spec {
                location: self.location.clone(),
                field: self.field.clone(),
                message: template_message(&self.name, &e),
            })
    }
}

fn template_message(name: &str, e: &minijinja::Error) -> String {
    let at = e
        .line()
        .map(|l| format!("{name}:{l}: "))
        .unwrap_or_else(|| format!("{name}: "));
    let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
    format!("template error at {at}{}{detail}", e.kind())
}

/// The request for one row: the body rendered, the headers with the
/// `Idempotency-Key` (secrets masked when `masked`, for showing).
pub fn render_request(
    renderer: &Renderer,
    r: &crate::spec::ResolvedJob,
    spec: &HttpSpec,
    target: &crate::spec::HttpTarget,
    fields: &[crate::dialect::Column],
    row: &[Value],
    masked: bool,
) -> Result<Rendered> {
    let Row {
        body,
        idempotency_key: idem,
        ..
    } = render_row(renderer, r, fields, row, masked)?;
    let mask = |s: &str| if masked { r.redactor.mask(s) } else { s.to_string() };
    let mut headers: Vec<(String, String)> = vec![("Content-Type".into(), "application/json".into())];
    for (k, v) in &target.headers {
        headers.retain(|(h, _)| !h.eq_ignore_ascii_case(k));
        headers.push((k.clone(), mask(v)));
    }
    headers.push((spec.idempotency_header.clone(), idem));
    Ok(Rendered {
        method: spec.method.clone(),
        url: mask(&target.url),
        headers,
        body,
    })
}

/// A row rendered through a job's template.
pub struct Row {
    /// The key as JSON.
    pub key: serde_json::Value,
    pub idempotency_key: String,
    /// The fields as a JSON object, typed.
    pub row: serde_json::Value,
    /// What the template made of it.
    pub body: String,
}

/// Renders one row: its fields as JSON, and the template over them, the
/// params and the idempotency key (secret params masked when `masked`).
pub fn render_row(
    renderer: &Renderer,
    r: &crate::spec::ResolvedJob,
    fields: &[crate::dialect::Column],
    row: &[Value],
    masked: bool,
) -> Result<Row> {
    let nk = r.job.key.len();
    let key = crate::value::key_to_json(&row[..nk]);
    let idem = idempotency_key(&r.job.name, &key);
    let names: Vec<String> = fields[nk..].iter().map(|c| c.name.clone()).collect();
    let types: Vec<String> = fields[nk..].iter().map(|c| c.sql_type.clone()).collect();
    let json = row_json(&names, &types, &row[nk..]);
    // A secret param reaches the receiver as it is, and shows masked.
    let params = if masked {
        r.params_json()
    } else {
        serde_json::Value::Object(r.params.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
    };
    let body = renderer.render(&json, &params, &idem)?;
    Ok(Row {
        key,
        idempotency_key: idem,
        row: json,
        body,
    })
}

/// The `Idempotency-Key` of a record: stable for the job and the key.
pub fn idempotency_key(job: &str, key: &serde_json::Value) -> String {
    let digest = Sha256::digest(format!("{job}\u{0}{key}").as_bytes());
    format!("infill-{}", &hex::encode(digest)[..32])
}

/// A row as the template sees it: SQL text typed back where the source
/// says what it is (integers, floats, booleans, JSON), so `{{ row.id }}`
/// renders 42, not "42".
pub fn row_json(names: &[String], types: &[String], values: &[Value]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (i, (name, v)) in names.iter().zip(values).enumerate() {
        let t = types.get(i).map(|t| t.to_ascii_lowercase()).unwrap_or_default();
        m.insert(name.clone(), typed(v, &t));
    }
    serde_json::Value::Object(m)
}

fn typed(v: &Value, t: &str) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null => J::Null,
        Value::Int(i) => J::from(*i),
        Value::Real(f) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
        Value::Bool(b) => J::Bool(*b),
        Value::Text(s) => {
            let base = t.split(['(', ' ']).next().unwrap_or("");
            let parsed = match base {
                "int2" | "int4" | "int8" | "smallint" | "integer" | "int" | "bigint" | "tinyint" | "mediumint" => {
                    s.parse::<i64>().ok().map(J::from)
                }
                "float4" | "float8" | "real" | "double" | "float" => s
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(J::Number),
                "bool" | "boolean" => match s.as_str() {
                    "t" | "true" | "1" => Some(J::Bool(true)),
                    "f" | "false" | "0" => Some(J::Bool(false)),
                    _ => None,
                },
                "json" | "jsonb" => serde_json::from_str(s).ok(),
                _ => None,
            };
            parsed.unwrap_or_else(|| J::String(s.clone()))
        }
        other => J::String(other.display()),
    }
}

/// What became of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// A 2xx, or a command that exited 0.
    Delivered,
    /// A final failure: a code (the HTTP status, `exit 3`, `timeout`) and
    /// what went wrong, with an excerpt of what the other side said.
    Failed { code: Option<String>, message: String },
}

/// True for the statuses worth another attempt.
pub fn retryable(status: u16) -> bool {
    matches!(status, 408 | 425 | 429) || (500..600).contains(&status)
}

/// How long to wait before attempt `attempt + 1` (attempt counts from 1):
/// what `Retry-After` asks (seconds or an HTTP date, capped), else
/// exponential backoff from `base` with `jitter` in 0..1 scaling it
/// between 50% and 100%.
pub fn retry_delay(
    attempt: u32,
    retry_after: Option<&str>,
    now: DateTime<Utc>,
    base: Duration,
    jitter: f64,
) -> Duration {
    if let Some(ra) = retry_after.map(str::trim) {
        if let Ok(secs) = ra.parse::<u64>() {
            return Duration::from_secs(secs).min(MAX_RETRY_AFTER);
        }
        if let Ok(at) = DateTime::parse_from_rfc2822(ra) {
            let wait = at.with_timezone(&Utc) - now;
            return wait.to_std().unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER);
        }
    }
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    exp.min(Duration::from_secs(30))
        .mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Sends a request with its retries. `sleep` waits (tests pass one that
/// records instead).
pub async fn send<F, Fut>(
    client: &reqwest::Client,
    req: &Rendered,
    max_attempts: u32,
    base: Duration,
    sleep: F,
) -> Delivery
where
    F: Fn(Duration) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let method = reqwest::Method::from_bytes(req.method.as_bytes()).unwrap_or(reqwest::Method::POST);
        let mut b = client.request(method, &req.url);
        for (k, v) in &req.headers {
            b = b.header(k, v);
        }
        let sent = b.body(req.body.clone()).send().await;
        let (status, retry_after, excerpt) = match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if resp.status().is_success() {
                    return Delivery::Delivered;
                }
                let ra = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = resp.text().await.unwrap_or_default();
                (Some(status), ra, excerpt_of(&body))
            }
            Err(e) => {
                let retry = e.is_timeout() || e.is_connect() || e.is_request() || e.is_body();
                if !retry {
                    return failed(None, attempt, &excerpt_of(&e.to_string()));
                }
                (None, None, excerpt_of(&error_chain(&e)))
            }
        };
        let again = status.is_none_or(retryable);
        if !again || attempt >= max_attempts {
            return failed(status, attempt, &excerpt);
        }
        let jitter = (jitter_seed(&req.body, attempt) % 1000) as f64 / 1000.0;
        sleep(retry_delay(attempt, retry_after.as_deref(), Utc::now(), base, jitter)).await;
    }
}

fn failed(status: Option<u16>, attempts: u32, excerpt: &str) -> Delivery {
    Delivery::Failed {
        code: status.map(|s| s.to_string()),
        message: format!(
            "{} after {attempts} attempt(s): {excerpt}",
            status.map_or("no response".to_string(), |s| format!("HTTP {s}"))
        ),
    }
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

pub(crate) fn excerpt_of(s: &str) -> String {
    let mut end = s.len().min(EXCERPT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Cheap per-request jitter without a random source: spreads retries of
/// different records apart.
fn jitter_seed(body: &str, attempt: u32) -> u64 {
    let d = Sha256::digest(format!("{attempt}{body}").as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn retry_after_seconds_date_and_backoff() {
        let now = at("2026-11-25T10:00:00Z");
        let base = Duration::from_millis(200);
        assert_eq!(retry_delay(1, Some("7"), now, base, 0.0), Duration::from_secs(7));
        assert_eq!(
            retry_delay(1, Some("Wed, 25 Nov 2026 10:00:30 GMT"), now, base, 0.0),
            Duration::from_secs(30)
        );
        // A date in the past: go at once; a huge value: capped.
        assert_eq!(
            retry_delay(1, Some("Wed, 25 Nov 2026 09:00:00 GMT"), now, base, 0.0),
            Duration::ZERO
        );
        assert_eq!(retry_delay(1, Some("99999"), now, base, 0.0), MAX_RETRY_AFTER);
        // Backoff doubles per attempt, jitter scales it between 50% and 100%.
        assert_eq!(retry_delay(1, None, now, base, 1.0), Duration::from_millis(200));
        assert_eq!(retry_delay(3, None, now, base, 1.0), Duration::from_millis(800));
        assert_eq!(retry_delay(3, None, now, base, 0.0), Duration::from_millis(400));
        assert_eq!(retry_delay(30, Some("soon"), now, base, 1.0), Duration::from_secs(30));
    }

    #[test]
    fn which_statuses_retry() {
        for s in [408, 425, 429, 500, 502, 503, 504] {
            assert!(retryable(s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 410, 422] {
            assert!(!retryable(s), "{s}");
        }
    }

    #[test]
    fn idempotency_key_is_stable_per_job_and_key() {
        let k = serde_json::json!([42]);
        assert_eq!(idempotency_key("replay", &k), idempotency_key("replay", &k));
        assert_ne!(idempotency_key("replay", &k), idempotency_key("other", &k));
        assert_ne!(
            idempotency_key("replay", &k),
            idempotency_key("replay", &serde_json::json!([43]))
        );
    }

    #[test]
    fn rows_are_typed_back_from_sql_text() {
        let names = vec!["id".to_string(), "ok".into(), "doc".into(), "name".into()];
        let types = vec!["INT8".to_string(), "BOOL".into(), "JSONB".into(), "TEXT".into()];
        let values = vec![
            Value::Text("42".into()),
            Value::Text("t".into()),
            Value::Text("{\"a\": 1}".into()),
            Value::Text("O\"Brien".into()),
        ];
        assert_eq!(
            row_json(&names, &types, &values),
            serde_json::json!({"id": 42, "ok": true, "doc": {"a": 1}, "name": "O\"Brien"})
        );
    }
}
