//! A master in its own process, for tests that kill the master:
//! `mini-master N PROGRAM [ARGS...]`. Prints `fork <worker> <pid>` and
//! `listening <worker> <addr>` lines and runs until killed.
use std::io::Write;
use std::process::ExitCode;

use cluster_master::{Event, MasterBuilder};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(n), Some(program)) = (args.first().and_then(|n| n.parse().ok()), args.get(1)) else {
        eprintln!("usage: mini-master N PROGRAM [ARGS...]");
        return ExitCode::from(2);
    };
    let master = match MasterBuilder::new(program)
        .args(&args[2..])
        .workers(n)
        .start()
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mini-master: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    while let Ok(e) = master.events().recv() {
        let line = match e {
            Event::Fork { worker, pid, .. } => format!("fork {worker} {pid}"),
            Event::Listening { worker, addr, .. } => format!("listening {worker} {addr}"),
            Event::Stopped { .. } => break,
            _ => continue,
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    ExitCode::SUCCESS
}
