//! cluster-cli: run a program as a cluster of workers (`spawn`), or run the built-in hello
//! HTTP worker (`hello`).
//!
//! Thin on purpose: parse, dispatch, map errors to exit codes. Everything else is a library
//! call into cluster-master / cluster-worker.
//!
//! Exit codes: 0 after a clean stop; 1 with a one-line reason on stderr when workers cannot
//! start (every slot errored), when a stop was not clean (forced, or a worker had to be
//! killed), or on any other fatal error; 2 for usage errors (clap's).
#![forbid(unsafe_code)]

mod args;
mod cpus;
mod hello;
mod log;
mod spawn;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    // clap prints usage errors itself and exits 2 (help and version exit 0).
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Spawn(a) => spawn::run(*a),
        Command::Hello(a) => hello::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            // One line, so that supervisors (systemd, tests) can show it as the reason.
            eprintln!("cluster-cli: {}", reason.replace('\n', " "));
            ExitCode::from(1)
        }
    }
}
