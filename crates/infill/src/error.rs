//! One error type for the engine, so the binary can map every failure to a
//! documented exit code, and the run loop can ask one question of any failure:
//! is it worth retrying (`is_transient`)?

use std::path::PathBuf;

use crate::spec::Location;

/// The exit codes infill documents (README, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// 0: done.
    Success = 0,
    /// 1: a row failed or a check failed.
    Failed = 1,
    /// 2: bad usage, bad spec, unknown table or column.
    Usage = 2,
    /// 3: approval missing, stale, expired or drifted.
    Approval = 3,
    /// 4: cannot proceed (target unreachable, job held, definition changed, cancelled).
    CannotProceed = 4,
    /// 130: interrupted by a signal after the batch in flight was settled.
    Interrupted = 130,
}

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec is malformed or inconsistent; names the file, line, column and field.
    #[error("{location}: {field}: {message}")]
    Spec {
        location: Location,
        field: String,
        message: String,
    },

    /// The command line asks for something that cannot be done.
    #[error("{0}")]
    Usage(String),

    /// A SQL fragment of the spec does not prepare against the target
    /// (unknown table or column, syntax error).
    #[error("{location}: {field}: does not prepare against database `{database}`: {message}")]
    Sql {
        location: Location,
        field: String,
        database: String,
        message: String,
    },

    /// The database cannot be reached or refused the connection.
    #[error(
        "cannot connect to database `{name}` ({url}): {message}. Check that the server is up and the URL is right; nothing was written."
    )]
    Connect {
        name: String,
        /// Always redacted.
        url: String,
        message: String,
    },

    /// Another live process holds the job.
    #[error(
        "job `{job}` is held by another live run{holder}; wait for it to finish or stop it (`infill pause`/`infill cancel`)"
    )]
    JobBusy { job: String, holder: String },

    /// The lock that keeps two runs apart was lost mid-run.
    #[error(
        "lost the lock of job `{job}`: {message}; stopped after the batch in flight. Run the same command again to continue."
    )]
    LockLost { job: String, message: String },

    /// An unfinished run exists but the job's definition changed since.
    #[error(
        "run {run} of job `{job}` is unfinished and the job's definition changed since it started. Restore the spec to continue it, or `infill cancel {run}` to start afresh."
    )]
    DefinitionChanged { run: String, job: String },

    /// No run matches the id or prefix.
    #[error("{0}")]
    RunNotFound(String),

    /// The run cannot be continued in its current state.
    #[error("{0}")]
    CannotProceed(String),

    /// A database statement failed.
    #[error("{context}: {source}")]
    Database {
        context: String,
        #[source]
        source: sqlx::Error,
    },

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A record of a `source.file` cannot be read.
    #[error(
        "{}:{line}: {message}; nothing from this batch was written. Fix the line and run the same command again to continue.",
        path.display()
    )]
    Input { path: PathBuf, line: u64, message: String },

    /// The approval gate refuses the run.
    #[error("{0}")]
    Approval(String),

    /// One or more checks did not hold.
    #[error("{0}")]
    ChecksFailed(String),

    /// Rows failed (reserved for the failure machinery; exit 1).
    #[error("{0}")]
    RowsFailed(String),

    /// SIGINT, SIGTERM or SIGHUP stopped the run after the batch in flight.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

/// Shorthand used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The documented exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Spec { .. } | Error::Usage(_) | Error::Sql { .. } | Error::RunNotFound(_) | Error::Input { .. } => {
                ExitCode::Usage
            }
            Error::Connect { .. }
            | Error::JobBusy { .. }
            | Error::LockLost { .. }
            | Error::DefinitionChanged { .. }
            | Error::CannotProceed(_) => ExitCode::CannotProceed,
            Error::RowsFailed(_) | Error::ChecksFailed(_) => ExitCode::Failed,
            Error::Approval(_) => ExitCode::Approval,
            Error::Interrupted(_) => ExitCode::Interrupted,
            Error::Database { source, .. } if is_connection_error(source) => ExitCode::CannotProceed,
            Error::Database { .. } | Error::Io { .. } => ExitCode::Failed,
        }
    }

    /// True when retrying the same work later may succeed: lost connections,
    /// deadlocks, serialization failures, lock and statement timeouts, too
    /// many connections. Everything else is reported, not retried.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database { source, .. } => is_transient_sqlx(source),
            Error::Connect { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn db(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
        let context = context.into();
        move |source| Error::Database { context, source }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// The transient classification, one list for the three databases.
/// PostgreSQL SQLSTATEs: 40001 serialization, 40P01 deadlock, 55P03 lock not
/// available, 57014 statement timeout (infill's own), 57P01..57P03 shutdown,
/// 08xxx connection, 53300 too many connections. MySQL/MariaDB error numbers:
/// 1213 deadlock, 1205 lock wait timeout, 1040 too many connections, 2006/2013
/// server gone, 1927 connection killed, 3024/1969 statement time exceeded.
/// SQLite: SQLITE_BUSY (5) and SQLITE_LOCKED (6).
pub(crate) fn is_transient_sqlx(e: &sqlx::Error) -> bool {
    if is_connection_error(e) {
        return true;
    }
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    if code.starts_with("08") || code.starts_with("57P") {
        return true;
    }
    matches!(
        code.as_str(),
        "40001"
            | "40P01"
            | "55P03"
            | "57014"
            | "53300"
            | "1213"
            | "1205"
            | "1040"
            | "2006"
            | "2013"
            | "1927"
            | "3024"
            | "1969"
            | "5"
            | "6"
            | "261"
            | "517"
            | "262"
    ) || mysql_errno(db.as_ref()).is_some_and(|n| matches!(n, 1213 | 1205 | 1040 | 2006 | 2013 | 1927 | 3024 | 1969))
}

fn mysql_errno(db: &dyn sqlx::error::DatabaseError) -> Option<u16> {
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(|e| e.number())
}
