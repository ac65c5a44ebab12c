//! Sources other than a table. A table's candidates are written set-based,
//! with the candidate predicate re-checked inside the write; rows of a
//! query, of a diff between two databases or of a file cannot be re-checked
//! that way, so they are read a page at a time, in key order (or file
//! order), and the action is applied to each row of the page in the same
//! transaction as the page's checkpoint. The cursor is the last key read
//! (query, diff) or the byte offset after the last record read (file): a
//! resumed run reads on from there, and memory holds one page, never the
//! source.
//!
//! A diff looks the page's keys up in the other database (one bounded IN
//! list per chunk) and compares the keys found byte for byte, so two
//! engines' collations cannot disagree about which keys are missing.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::dialect::{Column, Db, Exec, SqlBuilder};
use crate::error::{Error, Result};
use crate::spec::{FileFormat, Location, ResolvedJob, Source, SqlText};
use crate::sql::Fragment;
use crate::value::{Key, Value};

/// One page of a source.
#[derive(Debug, Default)]
pub struct Page {
    /// The rows to apply: the key values, then the wanted fields.
    pub rows: Vec<Vec<Value>>,
    /// Records read (a diff reads more than it keeps).
    pub scanned: u64,
    /// Where the next page starts (None: nothing was read).
    pub cursor: Option<Key>,
    /// True when the source holds nothing after this page.
    pub end: bool,
    /// The file line of each row (file sources), for error messages.
    pub lines: Vec<u64>,
    /// For each row, the cursor just after it: where a batch that ends
    /// with that row leaves the run.
    pub cursors: Vec<Key>,
}

/// Reads a job's source page by page.
pub struct Reader {
    kind: Kind,
    /// The columns of each row: the key, then the fields asked for, typed
    /// as the source describes them ("" when it does not).
    pub fields: Vec<Column>,
}

enum Kind {
    Sql(Box<SqlSource>),
    File(FileSource),
}

struct SqlSource {
    db: Db,
    query: Fragment,
    params: BTreeMap<String, Value>,
    /// `infill_src.<key>`, quoted.
    key_q: Vec<String>,
    /// The key columns as the server describes them (for binding cursors).
    key_cols: Vec<Column>,
    /// The select list: keys, then the wanted fields, as values travel out.
    select: String,
    upper: Option<Key>,
    missing: Option<Missing>,
    fields: Vec<Column>,
}

/// The table a diff's keys are looked up in.
struct Missing {
    db: Db,
    table: String,
    key_q: Vec<String>,
    key_cols: Vec<Column>,
}

struct FileSource {
    path: PathBuf,
    format: FileFormat,
    /// For each wanted field (keys first), its position in a CSV record.
    csv_index: Vec<usize>,
    wanted: Vec<String>,
    nk: usize,
    /// Byte offset and line of the first record.
    start: (u64, u64),
    /// Fields in the CSV header.
    columns: usize,
    /// Whether a cursor from an earlier process was checked against the
    /// file as it is now.
    checked: bool,
}

/// Keys per IN list when a diff looks keys up.
const LOOKUP_CHUNK: usize = 1000;

fn sql_error(db_name: &str, text: &SqlText, message: String) -> Error {
    Error::Sql {
        location: text.location.clone(),
        field: text.field.clone(),
        database: db_name.to_string(),
        message,
    }
}

/// The databases a job's rows are read from, besides its target: the
/// source of a query or diff on another database, and where a diff looks
/// its keys up when that is not the target. Each is `target` when unset.
pub struct SourceDbs {
    source: Option<Db>,
    lookup: Option<Db>,
}

impl SourceDbs {
    /// Connects the ones the job names.
    pub async fn connect(r: &ResolvedJob, opts: &crate::dialect::ConnectOptions) -> Result<SourceDbs> {
        let source = match &r.source_db {
            Some(url) => Some(Db::connect(url, opts).await?),
            None => None,
        };
        let lookup = match &r.lookup_db {
            Some(url) => match Db::connect(url, opts).await {
                Ok(db) => Some(db),
                Err(e) => {
                    if let Some(s) = source {
                        s.close().await;
                    }
                    return Err(e);
                }
            },
            None => None,
        };
        Ok(SourceDbs { source, lookup })
    }

    /// Opens the job's reader (see [`Reader::open`]).
    pub async fn reader(&self, r: &ResolvedJob, target: &Db, wanted: Option<&[String]>) -> Result<Reader> {
        let source = self.source.as_ref().unwrap_or(target);
        let lookup = self.lookup.as_ref().unwrap_or(target);
        Reader::open(r, lookup, source, wanted).await
    }

    pub async fn close(self) {
        for db in [self.source, self.lookup].into_iter().flatten() {
            db.close().await;
        }
    }
}

/// The fields of a row the job's action uses: the `:name`s of its SQL, or
/// the `row.name`s of its template (None: the whole row).
pub fn wanted_fields(r: &ResolvedJob, target: &crate::target::Target) -> Result<Option<Vec<String>>> {
    if !r.job.outside() {
        return Ok(Some(target.row_cols.iter().map(|c| c.name.clone()).collect()));
    }
    // Every column, so that a name the row lacks fails in the template,
    // naming its line (a JSONL file has no header: the names it uses).
    match (&r.job.source, crate::http::Renderer::of_job(&r.job)?) {
        (
            Source::File {
                format: FileFormat::Jsonl,
                ..
            },
            Some(t),
        ) => Ok(t.wanted()),
        _ => Ok(None),
    }
}

impl Reader {
    /// Opens the source of `r` and checks that it holds the key and every
    /// field in `wanted` (the names the action binds). `source_db` is the
    /// database a query or diff reads; `target` the job's own.
    pub async fn open(r: &ResolvedJob, target: &Db, source_db: &Db, wanted: Option<&[String]>) -> Result<Reader> {
        let job = &r.job;
        // Keys come first; wanted fields follow in `wanted` order, even
        // where one is also a key column. None: every column.
        let out_names: Option<Vec<String>> = wanted.map(|w| job.key.iter().chain(w).cloned().collect());
        let sql_source = |text: SqlText, missing: Option<Missing>| async move {
            let s = SqlSource::open(source_db, &text, r, out_names.as_deref(), missing).await?;
            let fields = s.fields.clone();
            Ok::<_, Error>(Reader {
                kind: Kind::Sql(Box::new(s)),
                fields,
            })
        };
        match &job.source {
            Source::Table => {
                // An http action reads the table's rows like a query's.
                let d = source_db.dialect;
                let filter = job
                    .filter
                    .as_ref()
                    .map(|f| format!(" WHERE ({})", f.sql))
                    .unwrap_or_default();
                let text = SqlText {
                    sql: format!("SELECT * FROM {}{filter}", d.quote_table(&job.table)),
                    field: format!("jobs.{}.source.table", job.name),
                    location: job.table_at.clone(),
                };
                sql_source(text, None).await
            }
            Source::Query { sql, .. } => sql_source(sql.clone(), None).await,
            Source::Diff {
                sql,
                missing_in,
                missing_at,
                ..
            } => {
                let missing = Missing::open(target, missing_in, missing_at, &job.key, &job.name).await?;
                sql_source(sql.clone(), Some(missing)).await
            }
            Source::File { path, format, at } => {
                let f = FileSource::open(path, *format, at, &job.name, &job.key, wanted)?;
                let fields = f
                    .wanted
                    .iter()
                    .map(|n| Column {
                        name: n.clone(),
                        sql_type: String::new(),
                    })
                    .collect();
                Ok(Reader {
                    kind: Kind::File(f),
                    fields,
                })
            }
        }
    }

    /// The last key the source holds now, frozen as the run's upper bound
    /// (rows added later are the application's). None for files.
    pub async fn max_key(&mut self) -> Result<Option<Key>> {
        match &mut self.kind {
            Kind::Sql(s) => s.max_key().await,
            Kind::File(_) => Ok(None),
        }
    }

    /// Sets the upper bound (a resumed run's, as first frozen).
    pub fn set_upper(&mut self, upper: Option<Key>) {
        if let Kind::Sql(s) = &mut self.kind {
            s.upper = upper;
        }
    }

    /// The next page of up to `n` records after `cursor`.
    pub async fn page(&mut self, cursor: Option<&Key>, n: u64) -> Result<Page> {
        match &mut self.kind {
            Kind::Sql(s) => s.page(cursor, n).await,
            Kind::File(f) => f.page(cursor, n),
        }
    }

    /// How many records lie after `cursor` (counting, for plans and ETAs).
    pub async fn count_after(&mut self, cursor: Option<&Key>) -> Result<u64> {
        let mut total = 0;
        let mut c = cursor.cloned();
        loop {
            let p = self.page(c.as_ref(), 10_000).await?;
            total += p.rows.len() as u64;
            if p.end || p.cursor.is_none() {
                return Ok(total);
            }
            c = p.cursor;
        }
    }
}

impl SqlSource {
    async fn open(
        db: &Db,
        text: &SqlText,
        r: &ResolvedJob,
        out_names: Option<&[String]>,
        missing: Option<Missing>,
    ) -> Result<SqlSource> {
        let d = db.dialect;
        let query = Fragment::parse(&text.sql, d.backslash_escapes()).map_err(|m| Error::Spec {
            location: text.location.clone(),
            field: text.field.clone(),
            message: m,
        })?;
        let mut b = SqlBuilder::new(d);
        b.push("SELECT * FROM (")
            .fragment(&query, &r.params)
            .push(") infill_src");
        let mut conn = db.conn().await?;
        let described = conn.describe(&b.finish()).await.map_err(|e| match e {
            sqlx::Error::Database(dbe) => sql_error(&db.name, text, r.redactor.mask(dbe.message())),
            other => Error::Database {
                context: format!("cannot check {}", text.field),
                source: other,
            },
        })?;
        let find = |name: &str| {
            described
                .columns
                .iter()
                .find(|c| c.name == name)
                .or_else(|| described.columns.iter().find(|c| c.name.eq_ignore_ascii_case(name)))
                .cloned()
        };
        let all: Vec<String>;
        let out_names = match out_names {
            Some(n) => n,
            None => {
                all = r
                    .job
                    .key
                    .iter()
                    .cloned()
                    .chain(described.columns.iter().map(|c| c.name.clone()))
                    .collect();
                &all
            }
        };
        let mut cols = Vec::new();
        for name in out_names {
            let c = find(name).ok_or_else(|| {
                sql_error(
                    &db.name,
                    text,
                    format!(
                        "the query returns no column `{name}` (the key or a :{name} of the action needs it); it returns: {}",
                        described.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                )
            })?;
            cols.push(c);
        }
        let nk = r.job.key.len();
        let key_cols: Vec<Column> = cols[..nk]
            .iter()
            .map(|c| Column {
                name: c.name.clone(),
                sql_type: if c.sql_type == "?" {
                    String::new()
                } else {
                    c.sql_type.clone()
                },
            })
            .collect();
        let key_q: Vec<String> = key_cols
            .iter()
            .map(|c| format!("infill_src.{}", d.quote_ident(&c.name)))
            .collect();
        let select = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "{} AS infill_c{i}",
                    d.value_out(&format!("infill_src.{}", d.quote_ident(&c.name)))
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Ok(SqlSource {
            fields: cols.clone(),
            db: db.clone(),
            query,
            params: r.params.clone(),
            key_q,
            key_cols,
            select,
            upper: None,
            missing,
        })
    }

    fn order_by(&self, desc: bool) -> String {
        let dir = if desc { " DESC" } else { "" };
        format!(
            " ORDER BY {}",
            self.key_q
                .iter()
                .map(|k| format!("{k}{dir}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    fn base(&self, b: &mut SqlBuilder<'_>, select: &str) {
        b.push("SELECT ")
            .push(select)
            .push(" FROM (")
            .fragment(&self.query, &self.params)
            .push(") infill_src");
    }

    async fn max_key(&mut self) -> Result<Option<Key>> {
        let d = self.db.dialect;
        let mut b = SqlBuilder::new(d);
        let keys: Vec<String> = self.key_q.iter().map(|k| d.value_out(k)).collect();
        self.base(&mut b, &keys.join(", "));
        b.push(&self.order_by(true)).push(" LIMIT 1");
        let mut c = self.db.conn().await?;
        let rows = c
            .fetch(&b.finish())
            .await
            .map_err(Error::db("cannot read the source's last key"))?;
        Ok(rows.into_iter().next())
    }

    async fn page(&mut self, cursor: Option<&Key>, n: u64) -> Result<Page> {
        let d = self.db.dialect;
        let mut b = SqlBuilder::new(d);
        let select = self.select.clone();
        self.base(&mut b, &select);
        let mut conds = Vec::new();
        for (key, cmp) in [(cursor, 0), (self.upper.as_ref(), 1)] {
            let Some(key) = key else { continue };
            let mut value = |i: usize| {
                let ph = b.arg(key[i].clone());
                d.value_in(&ph, &self.key_cols[i])
            };
            conds.push(if cmp == 0 {
                d.key_after(&self.key_q, &mut value)
            } else {
                d.key_at_most(&self.key_q, &mut value)
            });
        }
        if !conds.is_empty() {
            b.push(" WHERE ").push(&conds.join(" AND "));
        }
        b.push(&self.order_by(false)).push(&format!(" LIMIT {n}"));
        let rows = {
            let mut c = self.db.conn().await?;
            c.fetch(&b.finish())
                .await
                .map_err(Error::db("cannot read the source"))?
        };
        let nk = self.key_q.len();
        let scanned = rows.len() as u64;
        let cursor = rows.last().map(|r| r[..nk].to_vec());
        let end = scanned < n;
        let rows = match &self.missing {
            Some(m) => m.keep_missing(rows, nk).await?,
            None => rows,
        };
        Ok(Page {
            lines: Vec::new(),
            cursors: rows.iter().map(|r| r[..nk].to_vec()).collect(),
            rows,
            scanned,
            cursor,
            end,
        })
    }
}

/// A key as compared across engines: each value's text.
fn key_text(key: &[Value]) -> Vec<String> {
    key.iter().map(Value::display).collect()
}

impl Missing {
    async fn open(db: &Db, table: &[String], at: &Location, key: &[String], job: &str) -> Result<Missing> {
        let d = db.dialect;
        let mut conn = db.conn().await?;
        let columns = crate::target::read_columns(db, &mut conn, table).await?;
        let err = |message: String| Error::Sql {
            location: at.clone(),
            field: format!("jobs.{job}.source.diff.missing_in"),
            database: db.name.clone(),
            message,
        };
        if columns.is_empty() {
            return Err(err(format!("table `{}` does not exist", table.join("."))));
        }
        let mut key_cols = Vec::new();
        for k in key {
            let c = columns
                .iter()
                .find(|c| c.name == *k)
                .or_else(|| columns.iter().find(|c| c.name.eq_ignore_ascii_case(k)))
                .ok_or_else(|| err(format!("table `{}` has no key column `{k}`", table.join("."))))?;
            key_cols.push(c.clone());
        }
        Ok(Missing {
            db: db.clone(),
            table: d.quote_table(table),
            key_q: key_cols.iter().map(|c| d.quote_ident(&c.name)).collect(),
            key_cols,
        })
    }

    /// The rows whose key the table does not hold.
    async fn keep_missing(&self, rows: Vec<Vec<Value>>, nk: usize) -> Result<Vec<Vec<Value>>> {
        let d = self.db.dialect;
        let mut present: HashSet<Vec<String>> = HashSet::new();
        let mut conn = self.db.conn().await?;
        for chunk in rows.chunks((LOOKUP_CHUNK / nk).max(1)) {
            let mut b = SqlBuilder::new(d);
            let outs: Vec<String> = self.key_q.iter().map(|k| d.value_out(k)).collect();
            b.push("SELECT ")
                .push(&outs.join(", "))
                .push(" FROM ")
                .push(&self.table)
                .push(" WHERE ");
            let items: Vec<String> = chunk
                .iter()
                .map(|row| {
                    let vals: Vec<String> = (0..nk)
                        .map(|i| {
                            let ph = b.arg(row[i].clone());
                            d.value_in(&ph, &self.key_cols[i])
                        })
                        .collect();
                    if nk == 1 {
                        vals.into_iter().next().expect("one key column")
                    } else {
                        format!("({})", vals.join(", "))
                    }
                })
                .collect();
            if nk == 1 {
                b.push(&self.key_q[0]);
            } else {
                b.push(&format!("({})", self.key_q.join(", ")));
            }
            b.push(" IN (").push(&items.join(", ")).push(")");
            let found = conn
                .fetch(&b.finish())
                .await
                .map_err(Error::db("cannot look the keys up in the diff's table"))?;
            present.extend(found.iter().map(|k| key_text(k)));
        }
        Ok(rows
            .into_iter()
            .filter(|r| !present.contains(&key_text(&r[..nk])))
            .collect())
    }
}

impl FileSource {
    fn open(
        path: &Path,
        format: FileFormat,
        at: &Location,
        job: &str,
        key: &[String],
        wanted: Option<&[String]>,
    ) -> Result<FileSource> {
        let io = |e: std::io::Error| Error::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut start = (0, 1);
        let mut csv_index = Vec::new();
        let mut columns = 0;
        let mut out_names: Vec<String> = match wanted {
            Some(w) => key.iter().chain(w).cloned().collect(),
            None if format == FileFormat::Jsonl => {
                return Err(Error::Spec {
                    location: at.clone(),
                    field: format!("jobs.{job}.source.file"),
                    message:
                        "a JSONL file has no header: name the fields the template uses (row.<field>), not the whole row"
                            .into(),
                });
            }
            None => Vec::new(),
        };
        if format == FileFormat::Csv {
            let mut rdr = csv::ReaderBuilder::new().has_headers(true).from_reader(file);
            let header = rdr
                .headers()
                .map_err(|e| Error::Input {
                    path: path.to_path_buf(),
                    line: 1,
                    message: format!("cannot read the header: {e}"),
                })?
                .clone();
            if wanted.is_none() {
                out_names = key
                    .iter()
                    .cloned()
                    .chain(header.iter().map(|h| h.trim().to_string()))
                    .collect();
            }
            for name in &out_names {
                let i = header
                    .iter()
                    .position(|h| h.trim() == name)
                    .ok_or_else(|| Error::Spec {
                        location: at.clone(),
                        field: format!("jobs.{job}.source.file"),
                        message: format!(
                            "{} has no column `{name}` (the key or a :{name} of the action needs it); its header: {}",
                            path.display(),
                            header.iter().collect::<Vec<_>>().join(", ")
                        ),
                    })?;
                csv_index.push(i);
            }
            let pos = rdr.position();
            start = (pos.byte(), pos.line());
            columns = header.len();
        }
        Ok(FileSource {
            path: path.to_path_buf(),
            format,
            csv_index,
            wanted: out_names,
            nk: key.len(),
            start,
            columns,
            checked: false,
        })
    }

    fn bad(&self, line: u64, message: String) -> Error {
        Error::Input {
            path: self.path.clone(),
            line,
            message,
        }
    }

    /// A run continues from a byte offset, which is only right while the
    /// file before it is unchanged. A file fixed before that point (as
    /// one is between a run and its `--retry-failed`) would put the offset
    /// inside another line: rows skipped, or a line read from its middle.
    /// So the offset must still start line `line`.
    fn check_cursor(&self, offset: u64, line: u64) -> Result<()> {
        use std::io::Read;
        let io = |e: std::io::Error| Error::Io {
            path: self.path.clone(),
            source: e,
        };
        let mut file = std::fs::File::open(&self.path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        // Read in pieces: the offset may be gigabytes in.
        let mut buf = vec![0u8; 1 << 16];
        let (mut read, mut newlines, mut last) = (0u64, 0u64, None);
        while read < offset {
            let want = buf.len().min((offset - read) as usize);
            let n = file.read(&mut buf[..want]).map_err(io)?;
            if n == 0 {
                break;
            }
            newlines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
            last = Some(buf[n - 1]);
            read += n as u64;
        }
        // A record ends at a line feed, at a carriage return (the CSV
        // reader stops after the `\r` of a CRLF), or at the end of a file
        // whose last line has none.
        let at_line_start = matches!(last, None | Some(b'\n') | Some(b'\r')) || offset == len;
        if read == offset && at_line_start && newlines + 1 == line {
            return Ok(());
        }
        Err(Error::CannotProceed(format!(
            "{}: the file changed before the point where the run stopped (line {line} no longer starts at byte {offset}), so the run cannot go on from there; put the lines before line {line} back as they were, or `infill cancel` the run and start again",
            self.path.display()
        )))
    }

    fn page(&mut self, cursor: Option<&Key>, n: u64) -> Result<Page> {
        let (offset, line) = match cursor {
            Some(c) => match (c.first(), c.get(1)) {
                (Some(Value::Int(o)), Some(Value::Int(l))) => (*o as u64, *l as u64),
                _ => {
                    return Err(Error::CannotProceed(
                        "the run's file cursor is not an offset and a line".into(),
                    ));
                }
            },
            None => self.start,
        };
        let io = |e: std::io::Error| Error::Io {
            path: self.path.clone(),
            source: e,
        };
        if cursor.is_some() && !self.checked {
            self.check_cursor(offset, line)?;
        }
        self.checked = true;
        let mut file = std::fs::File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        let mut page = Page::default();
        let (mut next_offset, mut next_line) = (offset, line);
        match self.format {
            FileFormat::Csv => {
                let mut rdr = csv::ReaderBuilder::new()
                    .has_headers(false)
                    .flexible(true)
                    .from_reader(file);
                let mut rec = csv::StringRecord::new();
                while (page.scanned) < n {
                    let this_line = line + rdr.position().line() - 1;
                    let more = rdr
                        .read_record(&mut rec)
                        .map_err(|e| self.bad(this_line, e.to_string()))?;
                    if !more {
                        page.end = true;
                        break;
                    }
                    let pos = rdr.position();
                    next_offset = offset + pos.byte();
                    next_line = line + pos.line() - 1;
                    page.scanned += 1;
                    if rec.len() != self.columns {
                        return Err(self.bad(
                            this_line,
                            format!("{} fields, but the header names {}", rec.len(), self.columns),
                        ));
                    }
                    let mut row = Vec::with_capacity(self.csv_index.len());
                    for (name, &i) in self.wanted.iter().zip(&self.csv_index) {
                        let field = rec.get(i).ok_or_else(|| {
                            self.bad(
                                this_line,
                                format!("the record has {} fields; `{name}` is field {}", rec.len(), i + 1),
                            )
                        })?;
                        // An empty field is NULL.
                        row.push(if field.is_empty() {
                            Value::Null
                        } else {
                            Value::Text(field.to_string())
                        });
                    }
                    self.check_key(&row, this_line)?;
                    page.rows.push(row);
                    page.lines.push(this_line);
                    page.cursors.push(file_cursor(next_offset, next_line));
                }
            }
            FileFormat::Jsonl => {
                let mut rdr = BufReader::new(file);
                let mut text = String::new();
                while page.scanned < n {
                    text.clear();
                    let this_line = next_line;
                    let read = rdr.read_line(&mut text).map_err(io)?;
                    if read == 0 {
                        page.end = true;
                        break;
                    }
                    next_offset += read as u64;
                    next_line += 1;
                    page.scanned += 1;
                    if text.trim().is_empty() {
                        continue;
                    }
                    let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text.trim())
                        .map_err(|e| self.bad(this_line, format!("not a JSON object: {e}")))?;
                    let mut row = Vec::with_capacity(self.wanted.len());
                    for name in &self.wanted {
                        let v = obj
                            .get(name)
                            .ok_or_else(|| self.bad(this_line, format!("the record has no field `{name}`")))?;
                        row.push(json_value(v));
                    }
                    self.check_key(&row, this_line)?;
                    page.rows.push(row);
                    page.lines.push(this_line);
                    page.cursors.push(file_cursor(next_offset, next_line));
                }
            }
        }
        if page.scanned > 0 {
            page.cursor = Some(file_cursor(next_offset, next_line));
        }
        Ok(page)
    }

    fn check_key(&self, row: &[Value], line: u64) -> Result<()> {
        for (name, v) in self.wanted[..self.nk].iter().zip(row) {
            if *v == Value::Null {
                return Err(self.bad(line, format!("the key field `{name}` is empty")));
            }
        }
        Ok(())
    }
}

/// A file's cursor: the byte offset and line of the next record.
fn file_cursor(offset: u64, line: u64) -> Key {
    vec![Value::Int(offset as i64), Value::Int(line as i64)]
}

/// A JSONL field as a value: numbers that are integers stay integers,
/// objects and arrays travel as their JSON text.
fn json_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Text(n.to_string()),
        },
        serde_json::Value::String(s) => Value::Text(s.clone()),
        other => Value::Text(other.to_string()),
    }
}
