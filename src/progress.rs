//! Progress for a human: an indicatif bar with rows/s and ETA on a
//! terminal, a plain line every few seconds otherwise (logs, CI), and each
//! written row with `--verbose`.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use infill::run::{Confirmation, Event, Observer};
use infill::value::key_display;

const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    verbose: bool,
    terminal: bool,
    state: Mutex<State>,
}

struct State {
    /// How the run ended, kept for `--json` when the run ends in an error.
    finished: Option<infill::run::RunSummary>,
    bar: Option<ProgressBar>,
    scanned: u64,
    written: u64,
    last_line: Instant,
    started: Instant,
}

impl Progress {
    pub fn new(verbose: bool) -> Progress {
        Progress {
            verbose,
            terminal: std::io::stderr().is_terminal(),
            state: Mutex::new(State {
                finished: None,
                bar: None,
                scanned: 0,
                written: 0,
                last_line: Instant::now(),
                started: Instant::now(),
            }),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = self.state.lock().expect("progress lock").bar.take() {
            bar.finish_and_clear();
        }
    }

    /// The run's summary, once it finished (also when it ended in an error).
    pub fn summary(&self) -> Option<infill::run::RunSummary> {
        self.state.lock().expect("progress lock").finished.clone()
    }

    fn println(&self, st: &State, line: &str) {
        match &st.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Observer for Progress {
    fn on_event(&self, event: &Event<'_>) {
        let mut st = self.state.lock().expect("progress lock");
        match event {
            Event::Notice(text) => self.println(&st, text),
            Event::Started {
                estimated_keys,
                scanned_keys,
                ..
            } => {
                st.scanned = *scanned_keys;
                st.started = Instant::now();
                if self.terminal {
                    let bar = ProgressBar::with_draw_target(*estimated_keys, ProgressDrawTarget::stderr());
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} keys  {msg}  ETA {eta}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    bar.set_position(*scanned_keys);
                    bar.enable_steady_tick(Duration::from_millis(200));
                    st.bar = Some(bar);
                }
            }
            Event::Batch(b) => {
                st.scanned += b.batch.batch_size;
                st.written += b.batch.rows_changed;
                let rate = st.written as f64 / st.started.elapsed().as_secs_f64().max(0.001);
                let yielding = match b.busy_sessions {
                    0 => String::new(),
                    n => format!(", resting for {n} busy session{}", if n == 1 { "" } else { "s" }),
                };
                if let Some(bar) = &st.bar {
                    if bar.length().is_some_and(|l| st.scanned > l) {
                        bar.set_length(st.scanned);
                    }
                    bar.set_position(st.scanned);
                    bar.set_message(format!("{} written, {:.0} rows/s{yielding}", st.written, rate));
                } else if st.last_line.elapsed() >= PLAIN_EVERY {
                    st.last_line = Instant::now();
                    eprintln!(
                        "batch {}: {} keys scanned, {} rows written, {:.0} rows/s, cursor {}{yielding}",
                        b.batch.batch_no,
                        st.scanned,
                        st.written,
                        rate,
                        key_display(&b.batch.upper)
                    );
                }
            }
            Event::Row { key, values } => {
                if self.verbose {
                    let vals: Vec<String> = values.iter().map(|(c, v)| format!("{c}={}", v.display())).collect();
                    self.println(&st, &format!("  ✓ {} → {}", key_display(key), vals.join(", ")));
                }
            }
            Event::Finished(summary) => {
                st.finished = Some((*summary).clone());
                if let Some(bar) = st.bar.take() {
                    bar.finish_and_clear();
                }
            }
        }
    }

    fn confirm(&self, c: &Confirmation<'_>) -> bool {
        eprint!(
            "Write {} candidate rows of job {} on {}? [y/N] ",
            c.candidates, c.job, c.target
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        if std::io::stdin().lock().read_line(&mut answer).is_err() {
            return false;
        }
        matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
    }
}
