//! The `infill` command: parse the arguments, call the engine, exit with the
//! documented code. Everything else lives in the `infill` library.

mod cli;
mod output;
mod progress;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let code = cli::main(args);
    std::process::ExitCode::from(code)
}
