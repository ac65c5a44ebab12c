//! `action.exec`: a program run once per row, for work only a script can
//! do (a CLI, an SDK call). The row goes to its stdin as JSON (or through
//! the job's `stdin` template) and its fields to `ROW_<NAME>` variables; a
//! zero exit settles the row, anything else (a non-zero exit, a signal, the
//! `timeout`) is a row failure, recorded in `infill_failures` with an
//! excerpt of what the program printed. It runs through the same loop as
//! `action.http`: `concurrency` programs at once, the job's `rate`, the same
//! checkpoint (after a kill -9, at most `concurrency` rows run again, each
//! with the same `INFILL_IDEMPOTENCY_KEY`).
//!
//! The environment is cleared: the program sees PATH, the variables the
//! spec lists in `env`, and infill's own (`INFILL_JOB`, `INFILL_RUN_ID`,
//! `INFILL_KEY`, `INFILL_IDEMPOTENCY_KEY`). Database passwords and other
//! secrets in infill's environment do not leak into it by default.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::error::Result;
use crate::http::{Delivery, Renderer, excerpt_of};
use crate::spec::{ExecSpec, ResolvedJob};
use crate::value::Value;

/// One row's command, ready to start.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub stdin: String,
    pub timeout: Duration,
}

/// The variable name of a field: `ROW_` and the name in upper case, any
/// character other than a letter, digit or `_` as `_`.
pub fn env_name(field: &str) -> String {
    let mut out = String::from("ROW_");
    out.extend(field.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    out
}

/// The command for one row. `masked` hides secrets (for plans).
pub fn prepare(
    spec: &ExecSpec,
    renderer: &Renderer,
    r: &ResolvedJob,
    run_id: &str,
    fields: &[crate::dialect::Column],
    row: &[Value],
    masked: bool,
) -> Result<Prepared> {
    let rendered = crate::http::render_row(renderer, r, fields, row, masked)?;
    let mut env: Vec<(String, String)> = Vec::new();
    for name in std::iter::once("PATH").chain(spec.pass_env.iter().map(String::as_str)) {
        if let Some(v) = std::env::var_os(name) {
            env.push((name.to_string(), v.to_string_lossy().into_owned()));
        }
    }
    env.push(("INFILL_JOB".into(), r.job.name.clone()));
    env.push(("INFILL_RUN_ID".into(), run_id.to_string()));
    env.push(("INFILL_KEY".into(), rendered.key.to_string()));
    env.push(("INFILL_IDEMPOTENCY_KEY".into(), rendered.idempotency_key.clone()));
    for (name, value) in rendered.row.as_object().into_iter().flatten() {
        let text = match value {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        env.push((env_name(name), text));
    }
    Ok(Prepared {
        program: spec.program.clone(),
        args: spec.args.clone(),
        dir: spec.dir.clone(),
        env,
        stdin: rendered.body,
        timeout: spec.timeout,
    })
}

/// Runs the command to its end or its timeout (then kills it).
pub async fn run(cmd: Prepared) -> Delivery {
    let shown = cmd.program.display().to_string();
    let child = tokio::process::Command::new(&cmd.program)
        .args(&cmd.args)
        .current_dir(&cmd.dir)
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Delivery::Failed {
                code: Some("spawn".into()),
                message: format!("cannot start {shown}: {e}"),
            };
        }
    };
    let pid = child.id();
    let stdin = child.stdin.take();
    let input = cmd.stdin.into_bytes();
    // A program that exits without reading its input is not an error.
    let feed = async move {
        if let Some(mut s) = stdin {
            let _ = s.write_all(&input).await;
            let _ = s.shutdown().await;
        }
    };
    let finished = tokio::time::timeout(cmd.timeout, async {
        let (out, ()) = tokio::join!(child.wait_with_output(), feed);
        out
    })
    .await;
    let out = match finished {
        Err(_) => {
            // The whole group, so nothing it started lives on.
            if let Some(pid) = pid {
                // SAFETY: kill(2) with a negative pid signals that process group.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            return Delivery::Failed {
                code: Some("timeout".into()),
                message: format!("{shown} ran longer than {:?} and was killed", cmd.timeout),
            };
        }
        Ok(Err(e)) => {
            return Delivery::Failed {
                code: Some("wait".into()),
                message: format!("cannot wait for {shown}: {e}"),
            };
        }
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Delivery::Delivered;
    }
    let said = String::from_utf8_lossy(if out.stderr.is_empty() {
        &out.stdout
    } else {
        &out.stderr
    });
    let said = excerpt_of(said.trim());
    match out.status.code() {
        Some(c) => Delivery::Failed {
            code: Some(format!("exit {c}")),
            message: format!("{shown} exited with status {c}: {said}"),
        },
        None => {
            use std::os::unix::process::ExitStatusExt;
            let sig = out.status.signal().unwrap_or(0);
            Delivery::Failed {
                code: Some(format!("signal {sig}")),
                message: format!("{shown} was killed by signal {sig}: {said}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_become_variable_names() {
        assert_eq!(env_name("email"), "ROW_EMAIL");
        assert_eq!(env_name("user-id"), "ROW_USER_ID");
        assert_eq!(env_name("Ärger"), "ROW__RGER");
    }

    fn cmd(script: &str, timeout: Duration) -> Prepared {
        Prepared {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            dir: std::env::temp_dir(),
            env: vec![
                ("ROW_NAME".into(), "ada".into()),
                ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
            ],
            stdin: "{\"name\":\"ada\"}".into(),
            timeout,
        }
    }

    #[tokio::test]
    async fn exit_codes_and_timeouts() {
        let ok = run(cmd(
            "read line; [ \"$line\" = '{\"name\":\"ada\"}' ] && [ \"$ROW_NAME\" = ada ]",
            Duration::from_secs(10),
        ))
        .await;
        assert!(matches!(ok, Delivery::Delivered), "{ok:?}");
        match run(cmd("echo 'no such user' >&2; exit 3", Duration::from_secs(10))).await {
            Delivery::Failed { code, message } => {
                assert_eq!(code.as_deref(), Some("exit 3"));
                assert!(message.ends_with("exited with status 3: no such user"), "{message}");
            }
            d => panic!("{d:?}"),
        }
        let started = std::time::Instant::now();
        match run(cmd("sleep 30", Duration::from_millis(200))).await {
            Delivery::Failed { code, .. } => assert_eq!(code.as_deref(), Some("timeout")),
            d => panic!("{d:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "killed, not waited for");
        // The environment is what was given: nothing inherited.
        let clean = run(cmd(
            "[ -z \"$HOME\" ] && [ -z \"$DATABASE_URL\" ]",
            Duration::from_secs(10),
        ))
        .await;
        assert!(matches!(clean, Delivery::Delivered), "{clean:?}");
    }
}
