//! The audit log: one JSONL file per run under `infill_logs/` (the spec's
//! `log_dir`), appended to by every process that works on the run, flushed
//! line by line so a kill -9 keeps everything up to the last batch. It is a
//! contract (docs/audit-log.md), separate from `tracing` diagnostics, and
//! every line passes through the redactor.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::secret::Redactor;

/// An open audit log.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    run_id: String,
    redactor: Redactor,
}

impl AuditLog {
    /// Opens (appending) the log of `run_id` in `dir`, creating both when missing.
    pub fn open(dir: &Path, run_id: &str, redactor: Redactor) -> Result<AuditLog> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let path = dir.join(format!("{run_id}.jsonl"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(Error::io(&path))?;
        Ok(AuditLog {
            path,
            file,
            run_id: run_id.into(),
            redactor,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The highest `batch_no` among the file's `batch` lines (0 if none).
    /// A kill between a batch's commit and its line loses the line; the
    /// next process writes it from `infill_batches`.
    pub fn last_batch_no(&self) -> u64 {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "batch")
            .filter_map(|v| v["batch_no"].as_u64())
            .max()
            .unwrap_or(0)
    }

    /// Appends one event line: `ts`, `event`, `run_id`, then `fields`.
    pub fn write(&mut self, event: &str, fields: Value) -> Result<()> {
        let mut line = Map::new();
        line.insert("ts".into(), crate::state::now().into());
        line.insert("event".into(), event.into());
        line.insert("run_id".into(), self.run_id.clone().into());
        if let Value::Object(m) = fields {
            line.extend(m);
        }
        let mut text = self.redactor.mask(&Value::Object(line).to_string());
        text.push('\n');
        self.file.write_all(text.as_bytes()).map_err(Error::io(&self.path))?;
        Ok(())
    }
}
