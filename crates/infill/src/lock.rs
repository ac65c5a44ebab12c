//! One run per job at a time. On PostgreSQL and MySQL the lock is a session
//! lock (`pg_try_advisory_lock`, `GET_LOCK`) held on a connection of its own
//! for the whole run: if the process dies, the server drops the lock with
//! the connection. SQLite has no such thing, so the lock is a row of
//! `infill_locks` with host, pid and a heartbeat; a row whose process is
//! gone or whose heartbeat is older than 30 s is stale and taken over.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::dialect::{Db, DetachedConn, Exec};
use crate::error::{Error, Result};
use crate::host;
use crate::sql::Query;
use crate::value::Value;

const STALE_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(30);
const HEARTBEAT: Duration = Duration::from_secs(5);

/// A held job lock.
pub struct JobLock {
    job: String,
    kind: Kind,
}

enum Kind {
    Session {
        conn: DetachedConn,
        unlock: Query,
    },
    Row {
        db: Db,
        name: String,
        run_id: String,
        lost: Arc<AtomicBool>,
        heartbeat: tokio::task::JoinHandle<()>,
    },
}

impl JobLock {
    /// Takes the lock named `name` for `job`, or fails with `JobBusy`.
    pub async fn acquire(db: &Db, name: &str, job: &str, run_id: &str) -> Result<JobLock> {
        match db.dialect.try_lock_query(name) {
            Some(q) => {
                let mut conn = db.conn().await?.detach();
                let rows = conn.fetch(&q).await.map_err(Error::db("cannot take the job lock"))?;
                let got = matches!(rows.first().and_then(|r| r.first()), Some(Value::Int(1)));
                if !got {
                    return Err(Error::JobBusy {
                        job: job.into(),
                        holder: String::new(),
                    });
                }
                let unlock = db.dialect.unlock_query(name).expect("session locks unlock");
                Ok(JobLock {
                    job: job.into(),
                    kind: Kind::Session { conn, unlock },
                })
            }
            None => Self::acquire_row(db, name, job, run_id).await,
        }
    }

    async fn acquire_row(db: &Db, name: &str, job: &str, run_id: &str) -> Result<JobLock> {
        let mut conn = db.conn().await?;
        let mut tx = conn
            .begin_with(db.dialect.begin_write())
            .await
            .map_err(Error::db("cannot take the job lock"))?;
        let rows = tx
            .fetch(&db.q(
                "SELECT run_id, host, pid, heartbeat FROM infill_locks WHERE name = ?",
                vec![Value::Text(name.into())],
            ))
            .await
            .map_err(Error::db("cannot read infill_locks"))?;
        if let Some(r) = rows.first() {
            let text = |v: &Value| match v {
                Value::Text(s) => s.clone(),
                other => other.display(),
            };
            let (holder_host, pid) = (
                text(&r[1]),
                match r[2] {
                    Value::Int(p) => p as u32,
                    _ => 0,
                },
            );
            let beat = chrono::DateTime::parse_from_rfc3339(&text(&r[3]))
                .map(|t| t.with_timezone(&chrono::Utc))
                .ok();
            let dead = holder_host == host::hostname() && !host::pid_alive(pid);
            let silent = beat.is_none_or(|b| chrono::Utc::now() - b > STALE_AFTER);
            if !(dead || silent) {
                return Err(Error::JobBusy {
                    job: job.into(),
                    holder: format!(" (run {}, pid {pid} on {holder_host})", text(&r[0])),
                });
            }
        }
        tx.execute(&db.q(
            "DELETE FROM infill_locks WHERE name = ?",
            vec![Value::Text(name.into())],
        ))
        .await
        .map_err(Error::db("cannot take the job lock"))?;
        tx.execute(&db.q(
            "INSERT INTO infill_locks (name, run_id, host, pid, heartbeat) VALUES (?, ?, ?, ?, ?)",
            vec![
                Value::Text(name.into()),
                Value::Text(run_id.into()),
                Value::Text(host::hostname()),
                Value::Int(std::process::id() as i64),
                Value::Text(chrono::Utc::now().to_rfc3339()),
            ],
        ))
        .await
        .map_err(Error::db("cannot take the job lock"))?;
        tx.commit().await.map_err(Error::db("cannot take the job lock"))?;
        drop(conn);

        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = tokio::spawn({
            let (db, name, lost) = (db.clone(), name.to_string(), lost.clone());
            async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    let q = db.q(
                        "UPDATE infill_locks SET heartbeat = ? WHERE name = ? AND host = ? AND pid = ?",
                        vec![
                            Value::Text(chrono::Utc::now().to_rfc3339()),
                            Value::Text(name.clone()),
                            Value::Text(host::hostname()),
                            Value::Int(std::process::id() as i64),
                        ],
                    );
                    let Ok(mut c) = db.conn().await else { continue };
                    if let Ok(0) = c.execute(&q).await {
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
        Ok(JobLock {
            job: job.into(),
            kind: Kind::Row {
                db: db.clone(),
                name: name.into(),
                run_id: run_id.into(),
                lost,
                heartbeat,
            },
        })
    }

    /// Re-labels the lock row with the run id once it is known.
    pub async fn set_run(&mut self, id: &str) -> Result<()> {
        if let Kind::Row { db, name, run_id, .. } = &mut self.kind {
            let mut c = db.conn().await?;
            c.execute(&db.q(
                "UPDATE infill_locks SET run_id = ? WHERE name = ? AND host = ? AND pid = ?",
                vec![
                    Value::Text(id.into()),
                    Value::Text(name.clone()),
                    Value::Text(host::hostname()),
                    Value::Int(std::process::id() as i64),
                ],
            ))
            .await
            .map_err(Error::db("cannot update infill_locks"))?;
            *run_id = id.into();
        }
        Ok(())
    }

    /// Fails with `LockLost` when the lock is no longer held.
    pub async fn check(&mut self) -> Result<()> {
        let lost = match &mut self.kind {
            Kind::Session { conn, .. } => match conn.fetch(&Query::new("SELECT 1")).await {
                Ok(_) => None,
                Err(e) => Some(format!("its connection failed ({e})")),
            },
            Kind::Row { lost, .. } => lost
                .load(Ordering::SeqCst)
                .then(|| "another process took over the lock row".to_string()),
        };
        match lost {
            Some(message) => Err(Error::LockLost {
                job: self.job.clone(),
                message,
            }),
            None => Ok(()),
        }
    }

    /// Releases the lock.
    pub async fn release(self) {
        match self.kind {
            Kind::Session { mut conn, unlock } => {
                let _ = conn.fetch(&unlock).await;
            }
            Kind::Row {
                db, name, heartbeat, ..
            } => {
                heartbeat.abort();
                if let Ok(mut c) = db.conn().await {
                    let _ = c
                        .execute(&db.q(
                            "DELETE FROM infill_locks WHERE name = ? AND host = ? AND pid = ?",
                            vec![
                                Value::Text(name),
                                Value::Text(host::hostname()),
                                Value::Int(std::process::id() as i64),
                            ],
                        ))
                        .await;
                }
            }
        }
    }
}
