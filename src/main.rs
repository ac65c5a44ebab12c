//! The `infill` command: parse the arguments, call the engine, exit with the
//! documented code. Everything else lives in the `infill` library.

mod cli;
mod output;
mod progress;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Output into a closed pipe (`infill plan | head`) ends the process
    // quietly, as for other command-line tools, instead of a panic.
    // SAFETY: setting a signal's disposition to the default, before any
    // thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    let code = cli::main(args);
    std::process::ExitCode::from(code)
}
