//! Values that cross the boundary between infill and a database: keys,
//! cursors, undo images and params. PostgreSQL and MySQL values travel as
//! their server's canonical text (lossless for every type, cast back on the
//! server); SQLite values keep their storage class.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde_json::json;

/// One value read from or bound to a database.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Bool(bool),
    Text(String),
    Blob(Vec<u8>),
    Timestamp(NaiveDateTime),
    TimestampTz(DateTime<Utc>),
    Date(NaiveDate),
}

impl Value {
    /// The JSON form kept in state tables and the audit log. Ints and text
    /// map to JSON numbers and strings; the other kinds are tagged so that
    /// the value reads back exactly.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Int(i) => json!(i),
            Value::Real(f) => json!({ "real": f }),
            Value::Bool(b) => json!(b),
            Value::Text(s) => json!(s),
            Value::Blob(b) => json!({ "hex": hex::encode(b) }),
            Value::Timestamp(t) => json!({ "timestamp": t.format("%Y-%m-%d %H:%M:%S%.f").to_string() }),
            Value::TimestampTz(t) => json!({ "timestamptz": t.to_rfc3339() }),
            Value::Date(d) => json!({ "date": d.to_string() }),
        }
    }

    /// Reads the form written by [`Value::to_json`].
    pub fn from_json(v: &serde_json::Value) -> Option<Value> {
        Some(match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => Value::Int(n.as_i64()?),
            serde_json::Value::String(s) => Value::Text(s.clone()),
            serde_json::Value::Object(o) if o.len() == 1 => {
                let (tag, inner) = o.iter().next()?;
                match tag.as_str() {
                    "real" => Value::Real(inner.as_f64()?),
                    "hex" => Value::Blob(hex::decode(inner.as_str()?).ok()?),
                    "timestamp" => {
                        Value::Timestamp(NaiveDateTime::parse_from_str(inner.as_str()?, "%Y-%m-%d %H:%M:%S%.f").ok()?)
                    }
                    "timestamptz" => {
                        Value::TimestampTz(DateTime::parse_from_rfc3339(inner.as_str()?).ok()?.with_timezone(&Utc))
                    }
                    "date" => Value::Date(inner.as_str()?.parse().ok()?),
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    /// A short human rendering, for progress lines and `--verbose`.
    pub fn display(&self) -> String {
        match self {
            Value::Null => "NULL".into(),
            Value::Int(i) => i.to_string(),
            Value::Real(f) => f.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Text(s) => s.clone(),
            Value::Blob(b) => format!("x'{}'", hex::encode(b)),
            Value::Timestamp(t) => t.format("%Y-%m-%d %H:%M:%S%.f").to_string(),
            Value::TimestampTz(t) => t.to_rfc3339(),
            Value::Date(d) => d.to_string(),
        }
    }
}

impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// A key tuple (one value per key column), in key order.
pub type Key = Vec<Value>;

/// JSON array form of a key.
pub fn key_to_json(key: &[Value]) -> serde_json::Value {
    serde_json::Value::Array(key.iter().map(Value::to_json).collect())
}

/// Reads [`key_to_json`]'s form back.
pub fn key_from_json(v: &serde_json::Value) -> Option<Key> {
    v.as_array()?.iter().map(Value::from_json).collect()
}

/// Human form of a key: `42` or `(7, 42)`.
pub fn key_display(key: &[Value]) -> String {
    if key.len() == 1 {
        key[0].display()
    } else {
        format!("({})", key.iter().map(Value::display).collect::<Vec<_>>().join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_every_kind() {
        let values = vec![
            Value::Null,
            Value::Int(-9_007_199_254_740_993),
            Value::Real(0.1),
            Value::Bool(true),
            Value::Text("{\"real\": 1}".into()),
            Value::Blob(vec![0, 255, 7]),
            Value::Timestamp(
                NaiveDateTime::parse_from_str("2025-01-02 03:04:05.123456", "%Y-%m-%d %H:%M:%S%.f").unwrap(),
            ),
            Value::Date(NaiveDate::from_ymd_opt(2025, 9, 1).unwrap()),
        ];
        let json = key_to_json(&values);
        let text = serde_json::to_string(&json).unwrap();
        let back = key_from_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(back, values);
    }
}
