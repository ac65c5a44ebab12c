//! The target table of an `update` job, inspected once per run: its key and
//! written columns as the server types them, the spec's fragments parsed for
//! the dialect, and every statement the run loop sends, composed from the
//! dialect's pieces. Validation prepares each fragment against the server
//! (nothing executes), so an unknown table or column fails before any
//! write, naming the spec field.

use std::collections::BTreeMap;

use crate::dialect::{Column, Db, Dialect, Exec, SqlBuilder};
use crate::error::{Error, Result};
use crate::spec::{Location, ResolvedJob, SqlText};
use crate::sql::{Fragment, Part, Query};
use crate::value::{Key, Value};

/// One written column of an undo image: the column, its value before the
/// run, and the value the run wrote.
pub type ColumnImage = (Column, Value, Value);
/// A row's key and its written columns, as undo restores them.
pub type RowImage<'a> = (&'a Key, &'a [ColumnImage]);

/// The shared parts of a set-based undo statement (`Target::rows_join`).
struct RowsJoin<'r> {
    from: String,
    on: String,
    same: String,
    cols: Vec<&'r Column>,
}

/// One batch's bounds and bookkeeping, for dialects that write a batch in
/// one statement.
pub struct BatchShape<'a> {
    pub run_id: &'a str,
    pub batch_no: u64,
    pub lo: Option<&'a Key>,
    pub hi: &'a Key,
    pub limit: Option<u64>,
    pub undo: bool,
    /// How many keys the boundary put in the range (it may hold fewer).
    pub keys: u64,
}

/// The table `action.insert` writes: its columns, keys and expressions.
#[derive(Clone)]
pub struct InsertTarget {
    /// Quoted table name.
    pub table: String,
    pub parts: Vec<String>,
    /// Inserted columns with their expressions.
    pub columns: Vec<(Column, Fragment)>,
    /// The key an inserted row is known by (primary key, else the first
    /// unique key): what its undo image holds.
    pub key: Vec<Column>,
    /// Every unique key (MySQL guards its inserts with them).
    pub unique: Vec<Vec<Column>>,
    /// Every column of the table.
    pub all: Vec<Column>,
}

/// The target of a job, ready to compose statements.
#[derive(Clone)]
pub struct Target {
    pub dialect: &'static dyn Dialect,
    /// Quoted table name.
    pub table: String,
    pub keys: Vec<Column>,
    /// Quoted key column names.
    pub key_q: Vec<String>,
    /// Written columns with their expressions.
    pub sets: Vec<(Column, Fragment)>,
    /// The candidate predicate of the segment being run (see `segment`).
    pub filter: Option<Fragment>,
    /// `source.where` alone.
    pub base_filter: Option<Fragment>,
    /// Every written column is NULL in each row `source.where` admits
    /// (`c IS NULL` among its top-level conjuncts), so the before images
    /// are known without reading them. MySQL's `IS NULL` also matches a
    /// NOT NULL date column's zero date, so MariaDB uses it only when no
    /// written column holds dates or times.
    pub before_null: bool,
    /// `SELECT VERSION()` on MySQL/MariaDB (empty elsewhere): whether the
    /// engine can take the images itself.
    pub server_version: String,
    /// `priority = [...]`, in order.
    pub priority: Vec<Fragment>,
    /// `categories.NAME`, in name order.
    pub categories: Vec<(String, Fragment)>,
    /// Every column of the table, as the server types them.
    pub columns: Vec<Column>,
    /// `action.call`, and the row's columns it and `insert` bind (read
    /// with the candidates).
    pub call: Option<Fragment>,
    pub insert: Option<InsertTarget>,
    pub row_cols: Vec<Column>,
    /// The segment `filter` belongs to (0 without priority).
    pub segment_no: u64,
    pub params: BTreeMap<String, Value>,
}

fn sql_error(db: &Db, location: &Location, field: &str, message: String) -> Error {
    Error::Sql {
        location: location.clone(),
        field: field.into(),
        database: db.name.clone(),
        message,
    }
}

fn find_column(db: &Db, columns: &[Column], name: &str) -> Option<Column> {
    let cs = db.dialect.case_sensitive_columns();
    columns
        .iter()
        .find(|c| {
            if cs {
                c.name == name
            } else {
                c.name.eq_ignore_ascii_case(name)
            }
        })
        .cloned()
}

/// A table's columns as the server types them (none: no such table).
pub(crate) async fn read_columns(db: &Db, conn: &mut impl Exec, table: &[String]) -> Result<Vec<Column>> {
    let rows = conn
        .fetch(&db.dialect.columns_query(table))
        .await
        .map_err(Error::db(format!(
            "cannot read the columns of table `{}`",
            table.join(".")
        )))?;
    Ok(rows
        .iter()
        .map(|r| Column {
            name: r[0].display(),
            sql_type: r[1].display(),
        })
        .collect())
}

/// Reads the insert table's columns and unique keys.
async fn inspect_insert(
    db: &Db,
    conn: &mut impl Exec,
    spec: &crate::spec::Insert,
    exprs: Vec<Fragment>,
) -> Result<InsertTarget> {
    let d = db.dialect;
    let field = spec.columns[0]
        .1
        .field
        .replace(&format!(".insert.{}", spec.columns[0].0), ".table");
    let all = read_columns(db, conn, &spec.table).await?;
    let name = spec.table.join(".");
    if all.is_empty() {
        return Err(sql_error(
            db,
            &spec.table_at,
            &field,
            format!("table `{name}` does not exist"),
        ));
    }
    let mut columns = Vec::new();
    for ((col, text), f) in spec.columns.iter().zip(exprs) {
        let c = find_column(db, &all, col).ok_or_else(|| {
            sql_error(
                db,
                &text.location,
                &text.field,
                format!("column `{col}` does not exist in table `{name}`"),
            )
        })?;
        columns.push((c, f));
    }
    let rows = conn
        .fetch(&d.unique_keys_query(&spec.table))
        .await
        .map_err(Error::db("cannot read the insert table's keys"))?;
    let mut unique: Vec<Vec<Column>> = Vec::new();
    let mut last = None;
    for row in &rows {
        let index = (row[0].display(), row[1].display());
        let Some(c) = find_column(db, &all, &row[2].display()) else {
            continue;
        };
        if last.as_ref() != Some(&index) {
            unique.push(Vec::new());
            last = Some(index);
        }
        unique.last_mut().expect("pushed").push(c);
    }
    let key = unique.first().cloned().ok_or_else(|| {
        sql_error(
            db,
            &spec.table_at,
            &field,
            format!(
                "table `{name}` has no primary or unique key: infill could not tell the rows it inserts apart (to skip duplicates and to undo)"
            ),
        )
    })?;
    Ok(InsertTarget {
        table: d.quote_table(&spec.table),
        parts: spec.table.clone(),
        columns,
        key,
        unique,
        all,
    })
}

impl Target {
    /// Inspects the table and prepares every fragment of the job.
    pub async fn inspect(db: &Db, conn: &mut impl Exec, r: &ResolvedJob) -> Result<Target> {
        if r.job.reads_pages() {
            return Self::inspect_stream(db, conn, r).await;
        }
        let job = &r.job;
        let d = db.dialect;
        let table_field = format!("jobs.{}.source.table", job.name);
        let columns = read_columns(db, conn, &job.table).await?;
        if columns.is_empty() {
            return Err(sql_error(
                db,
                &job.table_at,
                &table_field,
                format!("table `{}` does not exist", job.table.join(".")),
            ));
        }
        let missing = |name: &str, at: &Location, field: String| {
            let hint = columns
                .iter()
                .find(|c| c.name.eq_ignore_ascii_case(name))
                .map(|c| format!(" (did you mean `{}`?)", c.name))
                .unwrap_or_default();
            sql_error(
                db,
                at,
                &field,
                format!(
                    "column `{name}` does not exist in table `{}`{hint}",
                    job.table.join(".")
                ),
            )
        };
        let mut keys = Vec::new();
        for k in &job.key {
            keys.push(
                find_column(db, &columns, k)
                    .ok_or_else(|| missing(k, &job.key_at, format!("jobs.{}.source.key", job.name)))?,
            );
        }
        let parse = |s: &SqlText| {
            Fragment::parse(&s.sql, d.backslash_escapes()).map_err(|m| Error::Spec {
                location: s.location.clone(),
                field: s.field.clone(),
                message: m,
            })
        };
        let mut sets = Vec::new();
        for (col, expr) in &job.updates {
            let c = find_column(db, &columns, col).ok_or_else(|| missing(col, &expr.location, expr.field.clone()))?;
            sets.push((c, parse(expr)?));
        }
        let filter = job.filter.as_ref().map(parse).transpose()?;
        let call = job.call.as_ref().map(parse).transpose()?;
        let mut row_cols: Vec<Column> = Vec::new();
        let mut binds: Vec<(&Fragment, &SqlText)> = Vec::new();
        let insert_exprs = match &job.insert {
            Some(i) => i
                .columns
                .iter()
                .map(|(_, t)| Ok((parse(t)?, t)))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        if let (Some(f), Some(text)) = (&call, &job.call) {
            binds.push((f, text));
        }
        binds.extend(insert_exprs.iter().map(|(f, t)| (f, *t)));
        for (f, text) in binds {
            for name in f.params() {
                if r.params.contains_key(name) || row_cols.iter().any(|c| c.name == name) {
                    continue;
                }
                let c = find_column(db, &columns, name).ok_or_else(|| {
                    sql_error(
                        db,
                        &text.location,
                        &text.field,
                        format!(
                            ":{name} is neither a param of the job nor a column of table `{}`",
                            job.table.join(".")
                        ),
                    )
                })?;
                row_cols.push(Column {
                    name: name.to_string(),
                    ..c
                });
            }
        }
        let priority = job.priority.iter().map(parse).collect::<Result<Vec<_>>>()?;
        let categories = job
            .categories
            .iter()
            .map(|(n, s)| Ok((n.clone(), parse(s)?)))
            .collect::<Result<Vec<_>>>()?;
        let insert = match &job.insert {
            Some(i) => Some(inspect_insert(db, conn, i, insert_exprs.into_iter().map(|(f, _)| f).collect()).await?),
            None => None,
        };
        let before_null = !sets.is_empty()
            && filter.as_ref().is_some_and(|f| {
                let pinned = f.null_conjuncts();
                sets.iter().all(|(c, _)| {
                    pinned.iter().any(|i| {
                        if d.case_sensitive_columns() {
                            c.name
                                == if i.quoted {
                                    i.name.clone()
                                } else {
                                    i.name.to_lowercase()
                                }
                        } else {
                            c.name.eq_ignore_ascii_case(&i.name)
                        }
                    })
                })
            });
        let server_version = match d.backend() {
            crate::dialect::Backend::MySql => conn
                .fetch(&Query::new("SELECT VERSION()"))
                .await
                .ok()
                .and_then(|rows| rows.into_iter().next())
                .and_then(|r| r.into_iter().next())
                .map(|v| v.display())
                .unwrap_or_default(),
            _ => String::new(),
        };
        let target = Target {
            dialect: d,
            table: d.quote_table(&job.table),
            key_q: keys.iter().map(|k| d.quote_ident(&k.name)).collect(),
            keys,
            sets,
            base_filter: filter.clone(),
            before_null,
            server_version,
            filter,
            priority,
            categories,
            columns,
            call,
            insert,
            row_cols,
            segment_no: 0,
            params: r.params.clone(),
        };
        target.prepare_all(db, conn, r).await?;
        Ok(target)
    }

    /// The target of a job whose rows come from a query, diff or file:
    /// `action.table` (none for a `call` without one), the action's
    /// fragments, and the fields of the row they bind (`:name`), typed by
    /// the server where it infers types (PostgreSQL), else bound as read.
    async fn inspect_stream(db: &Db, conn: &mut impl Exec, r: &ResolvedJob) -> Result<Target> {
        let job = &r.job;
        let d = db.dialect;
        let table_field = format!("jobs.{}.action.table", job.name);
        let columns = if job.table.is_empty() || job.outside() {
            Vec::new()
        } else {
            let columns = read_columns(db, conn, &job.table).await?;
            if columns.is_empty() {
                return Err(sql_error(
                    db,
                    &job.table_at,
                    &table_field,
                    format!("table `{}` does not exist", job.table.join(".")),
                ));
            }
            columns
        };
        let parse = |s: &SqlText| {
            Fragment::parse(&s.sql, d.backslash_escapes()).map_err(|m| Error::Spec {
                location: s.location.clone(),
                field: s.field.clone(),
                message: m,
            })
        };
        let mut keys = Vec::new();
        for k in &job.key {
            // An update finds its rows by the key: it must be the table's.
            let c = match find_column(db, &columns, k) {
                Some(c) => c,
                None if job.updates.is_empty() => Column {
                    name: k.clone(),
                    sql_type: String::new(),
                },
                None => {
                    return Err(sql_error(
                        db,
                        &job.key_at,
                        &format!("jobs.{}.source.key", job.name),
                        format!(
                            "the update finds its rows by the key, but table `{}` has no column `{k}`",
                            job.table.join(".")
                        ),
                    ));
                }
            };
            keys.push(c);
        }
        let mut sets = Vec::new();
        for (col, expr) in &job.updates {
            let c = find_column(db, &columns, col).ok_or_else(|| {
                sql_error(
                    db,
                    &expr.location,
                    &expr.field,
                    format!("column `{col}` does not exist in table `{}`", job.table.join(".")),
                )
            })?;
            sets.push((c, parse(expr)?));
        }
        let call = job.call.as_ref().map(parse).transpose()?;
        let insert_exprs = match &job.insert {
            Some(i) => i.columns.iter().map(|(_, t)| parse(t)).collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let mut row_cols: Vec<Column> = Vec::new();
        for f in call.iter().chain(&insert_exprs).chain(sets.iter().map(|(_, f)| f)) {
            for name in f.params() {
                if !r.params.contains_key(name) && !row_cols.iter().any(|c| c.name == name) {
                    row_cols.push(Column {
                        name: name.to_string(),
                        sql_type: String::new(),
                    });
                }
            }
        }
        let insert = match &job.insert {
            Some(i) => Some(inspect_insert(db, conn, i, insert_exprs).await?),
            None => None,
        };
        let mut target = Target {
            dialect: d,
            table: if job.table.is_empty() {
                String::new()
            } else {
                d.quote_table(&job.table)
            },
            key_q: keys.iter().map(|k| d.quote_ident(&k.name)).collect(),
            keys,
            sets,
            base_filter: None,
            before_null: false,
            server_version: String::new(),
            filter: None,
            priority: Vec::new(),
            categories: Vec::new(),
            columns,
            call,
            insert,
            row_cols,
            segment_no: 0,
            params: r.params.clone(),
        };
        if target.call.is_none() && target.insert.is_none() && target.sets.is_empty() {
            // An http action: nothing to prepare here.
            return Ok(target);
        }
        // The action's statement, prepared once: its errors name the
        // field, and the server's inferred parameter types type the row's
        // fields from then on.
        let marks: Vec<Value> = (0..target.row_cols.len())
            .map(|i| Value::Text(format!("\u{1}infill-field-{i}")))
            .collect();
        let (text, q) = match (&job.call, &job.insert) {
            (Some(t), _) => (t, target.call_statement(&marks)),
            (_, Some(i)) if d.insert_on_conflict() => (&i.columns[0].1, target.insert_row(&marks)),
            (_, Some(i)) => (&i.columns[0].1, target.insert_values(&marks)),
            _ => {
                let key: Key = vec![Value::Null; target.keys.len()];
                (&job.updates[0].1, target.update_row(&key, &marks))
            }
        };
        let described = conn.describe(&q).await.map_err(|e| match e {
            sqlx::Error::Database(dbe) => sql_error(db, &text.location, &text.field, r.redactor.mask(dbe.message())),
            other => Error::Database {
                context: format!("cannot check {}", text.field),
                source: other,
            },
        })?;
        for (n, arg) in q.args.iter().enumerate() {
            let Some(i) = marks.iter().position(|m| m == arg) else {
                continue;
            };
            if let Some(t) = described.params.get(n)
                && !t.is_empty()
                && t != "?"
                && target.row_cols[i].sql_type.is_empty()
            {
                target.row_cols[i].sql_type = t.to_ascii_lowercase();
            }
        }
        Ok(target)
    }

    /// Prepares each fragment in a statement of its own, so an error names
    /// the field that caused it.
    async fn prepare_all(&self, db: &Db, conn: &mut impl Exec, r: &ResolvedJob) -> Result<()> {
        let fail = |s: &SqlText, e: sqlx::Error| match e {
            sqlx::Error::Database(dbe) => sql_error(db, &s.location, &s.field, r.redactor.mask(dbe.message())),
            other => Error::Database {
                context: format!("cannot check {}", s.field),
                source: other,
            },
        };
        // Predicates: the filter, each priority segment's, each category's.
        let predicates = self
            .filter
            .iter()
            .zip(&r.job.filter)
            .chain(self.priority.iter().zip(&r.job.priority))
            .chain(
                self.categories
                    .iter()
                    .map(|(_, f)| f)
                    .zip(r.job.categories.iter().map(|(_, s)| s)),
            );
        for (f, text) in predicates {
            let mut b = SqlBuilder::new(self.dialect);
            b.push("SELECT 1 FROM ")
                .push(&self.table)
                .push(" WHERE (")
                .fragment(f, &self.params)
                .push(")");
            conn.prepare(&b.finish()).await.map_err(|e| fail(text, e))?;
        }
        if let (Some(_), Some(text)) = (&self.call, &r.job.call) {
            let nulls = vec![Value::Null; self.row_cols.len()];
            conn.prepare(&self.call_statement(&nulls))
                .await
                .map_err(|e| fail(text, e))?;
        }
        if let (Some(ins), Some(spec)) = (&self.insert, &r.job.insert) {
            let nulls = vec![Value::Null; self.row_cols.len()];
            let q = if self.dialect.insert_on_conflict() {
                self.insert_row(&nulls)
            } else {
                self.insert_values(&nulls)
            };
            let text = &spec.columns[0].1;
            conn.prepare(&q).await.map_err(|e| fail(text, e))?;
            if !self.dialect.insert_on_conflict() {
                let vals = vec![Value::Null; ins.columns.len()];
                conn.prepare(&self.insert_guarded(&vals))
                    .await
                    .map_err(|e| fail(text, e))?;
            }
        }
        for ((col, f), (_, text)) in self.sets.iter().zip(&r.job.updates) {
            let mut b = SqlBuilder::new(self.dialect);
            b.push("UPDATE ")
                .push(&self.table)
                .push(" SET ")
                .push(&self.dialect.quote_ident(&col.name))
                .push(" = (")
                .fragment(f, &self.params)
                .push(") WHERE 1 = 0");
            conn.prepare(&b.finish()).await.map_err(|e| fail(text, e))?;
        }
        Ok(())
    }

    /// How many segments a run goes through: one per priority predicate,
    /// then the rest.
    pub fn segments(&self) -> u64 {
        self.priority.len() as u64 + 1
    }

    /// The target restricted to one segment: priority segment `i` holds the
    /// candidates for which predicate `i` is true and no earlier one is; the
    /// last segment holds those for which none is. Every candidate falls in
    /// exactly one segment, so none is processed twice.
    pub fn segment(&self, i: u64) -> Target {
        let mut t = self.clone();
        t.segment_no = i;
        if self.priority.is_empty() {
            return t;
        }
        let mut parts: Vec<Part> = Vec::new();
        let mut push = |f: &Fragment, pre: &str, post: &str| {
            if !parts.is_empty() {
                parts.push(Part::Sql(" AND ".into()));
            }
            parts.push(Part::Sql(pre.into()));
            parts.extend(f.parts.iter().cloned());
            parts.push(Part::Sql(post.into()));
        };
        if let Some(w) = &self.base_filter {
            push(w, "(", ")");
        }
        for (j, p) in self.priority.iter().enumerate() {
            match (j as u64).cmp(&i) {
                std::cmp::Ordering::Less => push(p, "((", ") IS NOT TRUE)"),
                std::cmp::Ordering::Equal => push(p, "((", ") IS TRUE)"),
                std::cmp::Ordering::Greater => {}
            }
        }
        t.filter = Some(Fragment {
            source: format!("segment {i}"),
            parts,
        });
        t
    }

    /// A select list with every item aliased `infill_cN`, so output names
    /// never shadow the table's columns in ORDER BY.
    fn select_list(items: &[String]) -> String {
        items
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{e} AS infill_c{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn key_list(&self) -> String {
        self.key_q.join(", ")
    }

    /// The key columns, then the written columns, as they travel out.
    fn key_and_set_out(&self) -> Vec<String> {
        let mut cols = self.key_out();
        cols.extend(
            self.sets
                .iter()
                .map(|(c, _)| self.dialect.value_out(&self.dialect.quote_ident(&c.name))),
        );
        cols
    }

    fn key_out(&self) -> Vec<String> {
        self.key_q.iter().map(|k| self.dialect.value_out(k)).collect()
    }

    fn bind_one(&self, b: &mut SqlBuilder<'_>, key: &Key, i: usize) -> String {
        let ph = b.arg(key[i].clone());
        self.dialect.value_in(&ph, &self.keys[i])
    }

    fn bind_key(&self, b: &mut SqlBuilder<'_>, key: &Key) -> Vec<String> {
        key.iter()
            .zip(&self.keys)
            .map(|(v, col)| {
                let ph = b.arg(v.clone());
                self.dialect.value_in(&ph, col)
            })
            .collect()
    }

    /// Appends ` WHERE` and the conditions: key after `lo`, key at most
    /// `hi`, and the filter.
    pub(crate) fn push_range(&self, b: &mut SqlBuilder<'_>, lo: Option<&Key>, hi: Option<&Key>, with_filter: bool) {
        let mut conds = Vec::new();
        if let Some(lo) = lo {
            conds.push(self.dialect.key_after(&self.key_q, &mut |i| self.bind_one(b, lo, i)));
        }
        if let Some(hi) = hi {
            conds.push(self.dialect.key_at_most(&self.key_q, &mut |i| self.bind_one(b, hi, i)));
        }
        // Conditions are pushed in order; the filter's binds come last.
        if !conds.is_empty() || (with_filter && self.filter.is_some()) {
            b.push(" WHERE ");
        }
        b.push(&conds.join(" AND "));
        if with_filter && let Some(f) = &self.filter {
            if !conds.is_empty() {
                b.push(" AND ");
            }
            b.push("(").fragment(f, &self.params).push(")");
        }
    }

    pub(crate) fn order_by(&self, desc: bool) -> String {
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

    /// The largest key now: the run's frozen upper bound.
    pub fn max_key(&self) -> Query {
        Query::new(format!(
            "SELECT {} FROM {}{} LIMIT 1",
            Self::select_list(&self.key_out()),
            self.table,
            self.order_by(true)
        ))
    }

    /// The key `n` rows after `lo` (the batch's upper end), if the range holds that many.
    pub fn boundary(&self, lo: Option<&Key>, upper: &Key, n: u64) -> Query {
        // The inner scan has no upper bound: with `k > lo AND k <= upper` a
        // planner without statistics may read the whole range and sort it,
        // where `k > lo ORDER BY k LIMIT n` walks exactly n index entries.
        // The upper bound applies to the one key found.
        let mut b = SqlBuilder::new(self.dialect);
        let raw: Vec<String> = self
            .key_q
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} AS infill_r{i}"))
            .collect();
        let out: Vec<String> = (0..self.key_q.len()).map(|i| format!("infill_c{i}")).collect();
        b.push("SELECT ")
            .push(&out.join(", "))
            .push(" FROM (SELECT ")
            .push(&raw.join(", "))
            .push(", ");
        b.push(&Self::select_list(&self.key_out()))
            .push(" FROM ")
            .push(&self.table);
        self.push_range(&mut b, lo, None, false);
        b.push(&self.order_by(false))
            .push(&format!(" LIMIT 1 OFFSET {}) infill_next WHERE ", n.saturating_sub(1)));
        let raw_cols: Vec<String> = (0..self.key_q.len()).map(|i| format!("infill_r{i}")).collect();
        let upper_cond = self
            .dialect
            .key_at_most(&raw_cols, &mut |i| self.bind_one(&mut b, upper, i));
        b.push(&upper_cond);
        b.finish()
    }

    /// The candidates of a range with the current values of the written
    /// columns, locked; at most `limit` rows.
    pub fn candidates(&self, lo: Option<&Key>, hi: &Key, limit: Option<u64>) -> Query {
        let mut b = SqlBuilder::new(self.dialect);
        let mut cols = self.key_and_set_out();
        cols.extend(
            self.row_cols
                .iter()
                .map(|c| self.dialect.value_out(&self.dialect.quote_ident(&c.name))),
        );
        b.push("SELECT ")
            .push(&Self::select_list(&cols))
            .push(" FROM ")
            .push(&self.table);
        self.push_range(&mut b, lo, Some(hi), true);
        b.push(&self.order_by(false));
        if let Some(l) = limit {
            b.push(&format!(" LIMIT {l}"));
        }
        b.push(self.dialect.lock_clause());
        b.finish()
    }

    /// `UPDATE table SET col = (expr), ...` of the written columns.
    pub(crate) fn push_set(&self, b: &mut SqlBuilder<'_>) {
        b.push("UPDATE ").push(&self.table).push(" SET ");
        for (i, (col, f)) in self.sets.iter().enumerate() {
            if i > 0 {
                b.push(", ");
            }
            b.push(&self.dialect.quote_ident(&col.name))
                .push(" = (")
                .fragment(f, &self.params)
                .push(")");
        }
    }

    fn returning(&self) -> String {
        let cols = self.key_and_set_out();
        format!(" RETURNING {}", cols.join(", "))
    }

    fn push_in_list(&self, b: &mut SqlBuilder<'_>, keys: &[Key]) {
        let items: Vec<String> = keys
            .iter()
            .map(|k| {
                let v = self.bind_key(b, k);
                if v.len() == 1 {
                    v.into_iter().next().expect("one")
                } else {
                    format!("({})", v.join(", "))
                }
            })
            .collect();
        if self.key_q.len() == 1 {
            b.push(&self.key_q[0]);
        } else {
            b.push(&format!("({})", self.key_list()));
        }
        b.push(" IN (").push(&items.join(", ")).push(")");
    }

    /// The whole batch (lock, guarded write, undo images) as one statement,
    /// where the dialect can; it returns one row: candidates read, rows
    /// written, and the last candidate's key as a JSON array.
    pub fn fused_batch(&self, shape: &BatchShape<'_>) -> Option<crate::dialect::Fused> {
        self.dialect.fused_batch(self, shape)
    }

    /// The before image of a batch whose guard pins every written column
    /// to NULL: `{"col": null, ...}`, a column NULL in every row.
    pub fn known_null_image(&self) -> String {
        let nulls: serde_json::Map<String, serde_json::Value> = self
            .sets
            .iter()
            .map(|(c, _)| (c.name.clone(), serde_json::Value::Null))
            .collect();
        serde_json::Value::Object(nulls).to_string()
    }

    /// True when the engine writes and images this job's batches on its
    /// own, no row coming back to infill.
    pub fn engine_batches(&self, undo: bool) -> bool {
        let hi = vec![Value::Null; self.keys.len()];
        let shape = BatchShape {
            run_id: "",
            batch_no: 0,
            lo: None,
            hi: &hi,
            limit: None,
            undo,
            keys: 0,
        };
        self.call.is_none() && self.insert.is_none() && self.fused_batch(&shape).is_some()
    }

    /// The guarded write of the given (locked) keys; the filter is checked
    /// again so a row changed since it was read is skipped.
    pub fn update_keys(&self, keys: &[Key]) -> Query {
        let mut b = SqlBuilder::new(self.dialect);
        self.push_set(&mut b);
        b.push(" WHERE ");
        self.push_in_list(&mut b, keys);
        if let Some(f) = &self.filter {
            b.push(" AND (").fragment(f, &self.params).push(")");
        }
        if self.dialect.update_returning() {
            b.push(&self.returning());
        }
        b.finish()
    }

    /// The guarded write of a whole range (engines whose write lock is
    /// exclusive, so the range holds exactly the rows just read).
    pub fn update_range(&self, lo: Option<&Key>, hi: &Key) -> Query {
        let mut b = SqlBuilder::new(self.dialect);
        self.push_set(&mut b);
        self.push_range(&mut b, lo, Some(hi), true);
        if self.dialect.update_returning() {
            b.push(&self.returning());
        }
        b.finish()
    }

    /// One row's update by its key, `:name` binding the row's fields
    /// (`values` in `row_cols` order): a stream source's write.
    pub fn update_row(&self, key: &Key, values: &[Value]) -> Query {
        let d = self.dialect;
        let mut b = SqlBuilder::new(d);
        b.push("UPDATE ").push(&self.table).push(" SET ");
        for (i, (col, f)) in self.sets.iter().enumerate() {
            b.push(if i > 0 { ", " } else { "" })
                .push(&d.quote_ident(&col.name))
                .push(" = (");
            self.push_row_fragment(&mut b, f, values);
            b.push(")");
        }
        b.push(" WHERE ");
        self.push_key_eq(&mut b, key);
        b.finish()
    }

    /// The written columns' values of some rows, locked for the write
    /// that follows: a stream source's before-images.
    pub fn before_values(&self, keys: &[Key]) -> Query {
        let mut q = self.after_values(keys);
        q.sql.push_str(self.dialect.lock_clause());
        q
    }

    /// The values of the written columns after the write, for engines
    /// without RETURNING.
    pub fn after_values(&self, keys: &[Key]) -> Query {
        let mut b = SqlBuilder::new(self.dialect);
        let cols = self.key_and_set_out();
        b.push("SELECT ")
            .push(&Self::select_list(&cols))
            .push(" FROM ")
            .push(&self.table)
            .push(" WHERE ");
        self.push_in_list(&mut b, keys);
        b.finish()
    }

    /// How many candidates lie after `lo` up to `upper`.
    pub fn count_candidates(&self, lo: Option<&Key>, upper: &Key) -> Query {
        let mut b = SqlBuilder::new(self.dialect);
        b.push("SELECT COUNT(*) FROM ").push(&self.table);
        self.push_range(&mut b, lo, Some(upper), true);
        b.finish()
    }

    /// The keys after `lo` up to `upper`, one row each: for the planner's
    /// estimate of how many there are (`Dialect::explain`).
    pub fn keys_between(&self, lo: Option<&Key>, upper: &Key) -> Query {
        let mut b = SqlBuilder::new(self.dialect);
        b.push("SELECT 1 FROM ").push(&self.table);
        self.push_range(&mut b, lo, Some(upper), false);
        b.finish()
    }

    /// How many keys lie after `lo` up to `upper` (candidates or not).
    pub fn count_keys(&self, lo: Option<&Key>, upper: &Key) -> Query {
        let mut b = SqlBuilder::new(self.dialect);
        b.push("SELECT COUNT(*) FROM ").push(&self.table);
        self.push_range(&mut b, lo, Some(upper), false);
        b.finish()
    }

    /// The first `n` candidates with their current and computed values.
    pub fn sample(&self, upper: &Key, n: u64) -> Query {
        let mut b = SqlBuilder::new(self.dialect);
        let cols = self.key_and_set_out();
        b.push("SELECT ").push(&Self::select_list(&cols));
        for (i, (_, f)) in self.sets.iter().enumerate() {
            b.push(", ");
            let mark = b.mark();
            b.push("(").fragment(f, &self.params).push(")");
            b.wrap_since(mark, |expr| self.dialect.value_out(expr));
            b.push(&format!(" AS infill_e{i}"));
        }
        b.push(" FROM ").push(&self.table);
        self.push_range(&mut b, None, Some(upper), true);
        b.push(&self.order_by(false)).push(&format!(" LIMIT {n}"));
        b.finish()
    }

    /// Counts of the candidates up to `upper`, one column each: per
    /// category, then those in no category, then per priority segment
    /// (rows of an earlier segment are not counted again).
    pub fn breakdown(&self, upper: &Key) -> Query {
        let mut b = SqlBuilder::new(self.dialect);
        b.push("SELECT COUNT(*)");
        for (_, c) in &self.categories {
            b.push(", COUNT(CASE WHEN (")
                .fragment(c, &self.params)
                .push(") THEN 1 END)");
        }
        if !self.categories.is_empty() {
            b.push(", COUNT(CASE");
            for (_, c) in &self.categories {
                b.push(" WHEN (").fragment(c, &self.params).push(") THEN NULL");
            }
            b.push(" ELSE 1 END)");
        }
        for (i, p) in self.priority.iter().enumerate() {
            b.push(", COUNT(CASE");
            for earlier in &self.priority[..i] {
                b.push(" WHEN (").fragment(earlier, &self.params).push(") THEN NULL");
            }
            b.push(" WHEN (").fragment(p, &self.params).push(") THEN 1 END)");
        }
        b.push(" FROM ").push(&self.table);
        self.push_range(&mut b, None, Some(upper), true);
        b.finish()
    }

    /// A query the planner can estimate: the candidates, optionally those
    /// of one more predicate too.
    pub fn estimate_of(&self, also: Option<&Fragment>) -> Query {
        let mut b = SqlBuilder::new(self.dialect);
        b.push("SELECT 1 FROM ").push(&self.table);
        let mut conds: Vec<&Fragment> = self.filter.iter().collect();
        conds.extend(also);
        for (i, f) in conds.iter().enumerate() {
            b.push(if i == 0 { " WHERE (" } else { " AND (" })
                .fragment(f, &self.params)
                .push(")");
        }
        b.finish()
    }

    /// The target restricted to one key: its filter also requires the key
    /// (for `--retry-failed`, a batch of exactly that row).
    pub fn only_key(&self, key: &Key) -> Target {
        let mut t = self.clone();
        let mut parts: Vec<Part> = Vec::new();
        if let Some(f) = &self.filter {
            parts.push(Part::Sql("(".into()));
            parts.extend(f.parts.iter().cloned());
            parts.push(Part::Sql(") AND ".into()));
        }
        for (i, (col, v)) in self.keys.iter().zip(key).enumerate() {
            let name = format!("infill_only_k{i}");
            t.params.insert(name.clone(), v.clone());
            // The dialect's cast around a marker, split into text and the bind.
            let cast = self.dialect.value_in("\u{1}", col);
            let (before, after) = cast.split_once('\u{1}').unwrap_or((&cast, ""));
            if i > 0 {
                parts.push(Part::Sql(" AND ".into()));
            }
            parts.push(Part::Sql(format!("{} = {before}", self.key_q[i])));
            parts.push(Part::Param(name));
            parts.push(Part::Sql(after.to_string()));
        }
        t.filter = Some(Fragment {
            source: "one key".into(),
            parts,
        });
        t
    }

    /// A column of the table by name (as the engine compares names).
    pub fn column(&self, db: &Db, name: &str) -> Option<Column> {
        find_column(db, &self.columns, name)
    }

    fn push_key_eq(&self, b: &mut SqlBuilder<'_>, key: &Key) {
        let conds: Vec<String> = self
            .bind_key(b, key)
            .into_iter()
            .zip(&self.key_q)
            .map(|(v, k)| format!("{k} = {v}"))
            .collect();
        b.push(&conds.join(" AND "));
    }

    /// Undo's write: sets each column back to its before value where the
    /// row still holds exactly its after value (`Dialect::same_value`).
    pub fn restore(&self, key: &Key, cols: &[ColumnImage]) -> Query {
        let d = self.dialect;
        let mut b = SqlBuilder::new(d);
        b.push("UPDATE ").push(&self.table).push(" SET ");
        for (i, (c, before, _)) in cols.iter().enumerate() {
            let ph = b.arg(before.clone());
            b.push(if i > 0 { ", " } else { "" })
                .push(&d.quote_ident(&c.name))
                .push(" = ")
                .push(&d.value_in(&ph, c));
        }
        b.push(" WHERE ");
        self.push_key_eq(&mut b, key);
        for (c, _, after) in cols {
            let ph = b.arg(after.clone());
            b.push(" AND ").push(&d.same_value(&d.quote_ident(&c.name), &ph));
        }
        b.finish()
    }

    /// `restore` for many rows in one statement: an UPDATE joined to the
    /// rows' keys, before and after values (`Dialect::update_join`), under
    /// the same condition per row. Every row must carry the same columns, in
    /// the same order. It changes as many rows as it was given only when
    /// each row still held its after value.
    pub fn restore_rows(&self, rows: &[RowImage<'_>]) -> Query {
        let d = self.dialect;
        let mut b = SqlBuilder::new(d);
        let j = self.rows_join(&mut b, rows, true);
        let set: Vec<String> = j
            .cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let q = d.quote_ident(&c.name);
                format!("{q} = {}", d.value_in(&format!("infill_v.infill_b{i}"), c))
            })
            .collect();
        b.push(&d.update_join(&self.table, &set.join(", "), &j.from, &j.on, &j.same));
        b.finish()
    }

    /// `delete_inserted` for many rows in one statement (`Dialect::delete_join`):
    /// it deletes as many rows as it was given only when each row still held
    /// the values inserted.
    pub fn delete_rows(&self, rows: &[RowImage<'_>]) -> Query {
        let d = self.dialect;
        let mut b = SqlBuilder::new(d);
        let j = self.rows_join(&mut b, rows, false);
        let keys: Vec<String> = self.key_q.iter().map(|k| format!("{}.{k}", self.table)).collect();
        b.push(&d.delete_join(&self.table, &keys, &j.from, &j.on, &j.same));
        b.finish()
    }

    /// What both set-based undo statements share: the rows as a derived
    /// table `infill_v` (keys, then per column the before value when
    /// `before`, and the after value), bound in order; the join on the key;
    /// and the guard that each row still holds its after values.
    fn rows_join<'r>(&self, b: &mut SqlBuilder<'_>, rows: &[RowImage<'r>], before: bool) -> RowsJoin<'r> {
        let d = self.dialect;
        let cols: Vec<&Column> = rows
            .first()
            .map(|r| r.1.iter().map(|c| &c.0).collect())
            .unwrap_or_default();
        let mut names: Vec<String> = (0..self.keys.len()).map(|i| format!("infill_k{i}")).collect();
        for i in 0..cols.len() {
            if before {
                names.push(format!("infill_b{i}"));
            }
            names.push(format!("infill_a{i}"));
        }
        let values: Vec<Vec<String>> = rows
            .iter()
            .map(|(key, cs)| {
                let mut row = self.bind_key(b, key);
                for (_, b4, after) in cs.iter() {
                    if before {
                        row.push(b.arg(b4.clone()));
                    }
                    row.push(b.arg(after.clone()));
                }
                row
            })
            .collect();
        let on: Vec<String> = self
            .key_q
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{}.{k} = infill_v.infill_k{i}", self.table))
            .collect();
        let same: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let col = format!("{}.{}", self.table, d.quote_ident(&c.name));
                d.same_value(&col, &format!("infill_v.infill_a{i}"))
            })
            .collect();
        RowsJoin {
            from: d.rows_table(&values, &names, "infill_v"),
            on: on.join(" AND "),
            same: if same.is_empty() {
                "1 = 1".into()
            } else {
                same.join(" AND ")
            },
            cols,
        }
    }

    /// The current values of some columns of one row, as `value_out` renders them.
    pub fn current(&self, key: &Key, cols: &[Column]) -> Query {
        let d = self.dialect;
        let mut b = SqlBuilder::new(d);
        let list: Vec<String> = cols.iter().map(|c| d.value_out(&d.quote_ident(&c.name))).collect();
        b.push("SELECT ")
            .push(&Self::select_list(&list))
            .push(" FROM ")
            .push(&self.table)
            .push(" WHERE ");
        self.push_key_eq(&mut b, key);
        b.finish()
    }

    /// `action.call` for one row (see `push_row_fragment`).
    pub fn call_statement(&self, values: &[Value]) -> Query {
        let mut b = SqlBuilder::new(self.dialect);
        self.push_row_fragment(&mut b, self.call.as_ref().expect("a call job"), values);
        b.finish()
    }

    /// Appends a fragment whose `:name` binds a param or the row's column
    /// (`values` in `row_cols` order, cast back to the column's type).
    fn push_row_fragment(&self, b: &mut SqlBuilder<'_>, f: &Fragment, values: &[Value]) {
        let d = self.dialect;
        for part in &f.parts {
            match part {
                Part::Sql(s) => {
                    b.push(s);
                }
                Part::Param(name) => match self.row_cols.iter().position(|c| &c.name == name) {
                    Some(i) => {
                        let ph = b.arg(values.get(i).cloned().unwrap_or(Value::Null));
                        b.push(&d.value_in(&ph, &self.row_cols[i]));
                    }
                    None => {
                        b.bind(self.params.get(name).cloned().unwrap_or(Value::Null));
                    }
                },
            }
        }
    }

    fn insert_target(&self) -> &InsertTarget {
        self.insert.as_ref().expect("an insert job")
    }

    /// `INSERT ... ON CONFLICT DO NOTHING RETURNING` the key and the stored
    /// values: no row back means the row was there already.
    pub fn insert_row(&self, values: &[Value]) -> Query {
        let d = self.dialect;
        let ins = self.insert_target();
        let mut b = SqlBuilder::new(d);
        let names: Vec<String> = ins.columns.iter().map(|(c, _)| d.quote_ident(&c.name)).collect();
        b.push("INSERT INTO ")
            .push(&ins.table)
            .push(" (")
            .push(&names.join(", "))
            .push(") VALUES (");
        for (i, (_, f)) in ins.columns.iter().enumerate() {
            b.push(if i > 0 { ", (" } else { "(" });
            self.push_row_fragment(&mut b, f, values);
            b.push(")");
        }
        let mut ret: Vec<String> = ins.key.iter().map(|k| d.value_out(&d.quote_ident(&k.name))).collect();
        ret.extend(names.iter().map(|n| d.value_out(n)));
        b.push(") ON CONFLICT DO NOTHING RETURNING ").push(&ret.join(", "));
        b.finish()
    }

    /// The values a row's insert expressions give (for engines that guard
    /// the insert themselves).
    pub fn insert_values(&self, values: &[Value]) -> Query {
        let d = self.dialect;
        let ins = self.insert_target();
        let mut b = SqlBuilder::new(d);
        b.push("SELECT ");
        for (i, (_, f)) in ins.columns.iter().enumerate() {
            b.push(if i > 0 { ", " } else { "" });
            let mark = b.mark();
            b.push("(");
            self.push_row_fragment(&mut b, f, values);
            b.push(")");
            b.wrap_since(mark, |e| d.value_out(e));
        }
        b.finish()
    }

    /// Inserts computed values unless a row with the same unique key
    /// exists (`NOT EXISTS` over every unique key whose columns are all
    /// inserted; NULLs never match, as in a unique index).
    pub fn insert_guarded(&self, vals: &[Value]) -> Query {
        let d = self.dialect;
        let ins = self.insert_target();
        let mut b = SqlBuilder::new(d);
        let names: Vec<String> = ins.columns.iter().map(|(c, _)| d.quote_ident(&c.name)).collect();
        b.push("INSERT INTO ")
            .push(&ins.table)
            .push(" (")
            .push(&names.join(", "))
            .push(") SELECT ");
        for (i, ((c, _), v)) in ins.columns.iter().zip(vals).enumerate() {
            let ph = b.arg(v.clone());
            b.push(if i > 0 { ", " } else { "" }).push(&d.value_in(&ph, c));
        }
        b.push(" FROM DUAL");
        let mut guards = Vec::new();
        for key in &ins.unique {
            let mut conds = Vec::new();
            for k in key {
                let Some(i) = ins.columns.iter().position(|(c, _)| c.name == k.name) else {
                    conds.clear();
                    break;
                };
                let ph = b.arg(vals[i].clone());
                conds.push(format!("{} = {}", d.quote_ident(&k.name), d.value_in(&ph, k)));
            }
            if !conds.is_empty() {
                guards.push(format!("({})", conds.join(" AND ")));
            }
        }
        if !guards.is_empty() {
            b.push(" WHERE NOT EXISTS (SELECT 1 FROM ")
                .push(&ins.table)
                .push(" WHERE ")
                .push(&guards.join(" OR "))
                .push(")");
        }
        b.finish()
    }

    /// This target seen as the insert table: undo restores and deletes there.
    pub fn insert_view(&self) -> Option<Target> {
        let ins = self.insert.as_ref()?;
        let mut t = self.clone();
        t.table = ins.table.clone();
        t.keys = ins.key.clone();
        t.key_q = ins.key.iter().map(|k| self.dialect.quote_ident(&k.name)).collect();
        t.columns = ins.all.clone();
        Some(t)
    }

    /// Undo of an insert: deletes the row if it still holds exactly what
    /// was inserted.
    pub fn delete_inserted(&self, key: &Key, cols: &[(Column, Value)]) -> Query {
        let d = self.dialect;
        let mut b = SqlBuilder::new(d);
        b.push("DELETE FROM ").push(&self.table).push(" WHERE ");
        self.push_key_eq(&mut b, key);
        for (c, after) in cols {
            let ph = b.arg(after.clone());
            b.push(" AND ").push(&d.same_value(&d.quote_ident(&c.name), &ph));
        }
        b.finish()
    }
}
