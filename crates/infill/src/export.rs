//! `infill export`: a job's source rows, or the bodies its http action
//! would send, written to a JSON array or JSONL file without running the
//! action (seed 004's `--export-fixtures`). The file is written beside its
//! final name and renamed into place, so a reader sees the old file or the
//! whole new one, never half of it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::dialect::{ConnectOptions, Db};
use crate::error::{Error, Result};
use crate::source::SourceDbs;
use crate::spec::ResolvedJob;

/// Rows read per page.
const PAGE: u64 = 5_000;

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    pub job: String,
    pub path: PathBuf,
    pub rows: u64,
    /// `json` (one array) or `jsonl` (an object per line), from the name.
    pub format: &'static str,
}

/// Writes up to `limit` rows of the job's source to `out`.
pub async fn export(r: &ResolvedJob, out: &Path, limit: Option<u64>) -> Result<Exported> {
    let lines = matches!(out.extension().and_then(|e| e.to_str()), Some("jsonl") | Some("ndjson"));
    let opts = ConnectOptions::default();
    let target = Db::connect(&r.target, &opts).await?;
    let sources = match SourceDbs::connect(r, &opts).await {
        Ok(s) => s,
        Err(e) => {
            target.close().await;
            return Err(e);
        }
    };
    let written = write_rows(r, &target, &sources, out, lines, limit).await;
    sources.close().await;
    target.close().await;
    Ok(Exported {
        job: r.job.name.clone(),
        path: out.to_path_buf(),
        rows: written?,
        format: if lines { "jsonl" } else { "json" },
    })
}

async fn write_rows(
    r: &ResolvedJob,
    target: &Db,
    sources: &SourceDbs,
    out: &Path,
    lines: bool,
    limit: Option<u64>,
) -> Result<u64> {
    // Rows through the job's template (an http body, an exec stdin, an
    // export template), else as they are.
    let renderer = crate::http::Renderer::of_job(&r.job)?;
    let wanted = match (&renderer, &r.job.source) {
        (
            Some(t),
            crate::spec::Source::File {
                format: crate::spec::FileFormat::Jsonl,
                ..
            },
        ) => t.wanted(),
        _ => None,
    };
    let mut reader = sources.reader(r, target, wanted.as_deref()).await?;
    let name = out
        .file_name()
        .ok_or_else(|| Error::Usage(format!("--out {}: not a file name", out.display())))?;
    let tmp = out.with_file_name(format!(".{}.infill-{}", name.to_string_lossy(), std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| Error::Io { path, source: e }
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut w = std::io::BufWriter::new(file);
    let nk = r.job.key.len();
    let names: Vec<String> = reader.fields[nk..].iter().map(|c| c.name.clone()).collect();
    let types: Vec<String> = reader.fields[nk..].iter().map(|c| c.sql_type.clone()).collect();
    let mut cursor = None;
    let mut n = 0u64;
    let written: Result<()> = async {
        if !lines {
            w.write_all(b"[").map_err(io(&tmp))?;
        }
        'pages: loop {
            let page = reader.page(cursor.as_ref(), PAGE).await?;
            for row in &page.rows {
                if limit.is_some_and(|l| n >= l) {
                    break 'pages;
                }
                let item = match &renderer {
                    Some(t) => {
                        let body = crate::http::render_row(t, r, &reader.fields, row, true)?.body;
                        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body))
                    }
                    None => crate::http::row_json(&names, &types, &row[nk..]),
                };
                let text = serde_json::to_string(&item).expect("serialisable");
                let sep: &[u8] = match (lines, n) {
                    (true, _) => b"",
                    (false, 0) => b"\n  ",
                    (false, _) => b",\n  ",
                };
                w.write_all(sep).map_err(io(&tmp))?;
                w.write_all(text.as_bytes()).map_err(io(&tmp))?;
                if lines {
                    w.write_all(b"\n").map_err(io(&tmp))?;
                }
                n += 1;
            }
            if page.end || page.cursor.is_none() {
                break;
            }
            cursor = page.cursor;
        }
        if !lines {
            w.write_all(if n == 0 { b"]\n" } else { b"\n]\n" }).map_err(io(&tmp))?;
        }
        let file = w.into_inner().map_err(|e| Error::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io(out))
    }
    .await;
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|_| n)
}
