//! A master in its own process, for tests that kill the master or measure it:
//! `mini-master [--stall-events MS] [--loop normal|batch|behind:PERCENT] N PROGRAM [ARGS...]`.
//! Prints `fork <worker> <pid>`, `listening <worker> <addr>` and `exit <worker> <code|signal>`
//! lines and runs until killed.
//! `--stall-events MS` stops reading events for MS ms at the first user message, as an
//! embedder that falls behind. `--loop` sets [`MasterBuilder::loop_scheduling`] (`behind:P`:
//! [`LoopScheduling::BatchWhileBehind`] with strangers allowed P % of the CPU); without it the
//! default holds. The protocol is detected as `cluster-cli` does (`node ...` speaks Node's).
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use cluster_master::{BatchWhileBehind, Event, LoopScheduling, MasterBuilder, Protocol};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut stall = None;
    if args.first().map(String::as_str) == Some("--stall-events") {
        stall = args
            .get(1)
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis);
        args.drain(..2.min(args.len()));
    }
    let mut scheduling = Some(LoopScheduling::default());
    if args.first().map(String::as_str) == Some("--loop") {
        scheduling = match args.get(1).map(String::as_str) {
            Some("normal") => Some(LoopScheduling::Normal),
            Some("batch") => Some(LoopScheduling::Batch),
            Some(behind) => behind
                .strip_prefix("behind:")
                .and_then(|p| p.parse().ok())
                .map(|max_foreign_cpu_percent| {
                    LoopScheduling::BatchWhileBehind(BatchWhileBehind {
                        max_foreign_cpu_percent,
                        ..BatchWhileBehind::default()
                    })
                }),
            None => None,
        };
        args.drain(..2.min(args.len()));
    }
    let (Some(n), Some(program), Some(scheduling)) = (
        args.first().and_then(|n| n.parse().ok()),
        args.get(1),
        scheduling,
    ) else {
        eprintln!(
            "usage: mini-master [--stall-events MS] [--loop normal|batch|behind:PERCENT] N PROGRAM [ARGS...]"
        );
        return ExitCode::from(2);
    };
    let master = match MasterBuilder::new(program)
        .protocol(Protocol::detect(program.as_ref(), &args[2..]))
        .args(&args[2..])
        .workers(n)
        .loop_scheduling(scheduling)
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
        if matches!(e, Event::Message { .. })
            && let Some(stall) = stall.take()
        {
            let _ = writeln!(out, "stalling");
            let _ = out.flush();
            std::thread::sleep(stall);
            let _ = writeln!(out, "reading");
            let _ = out.flush();
        }
        let line = match e {
            Event::Fork { worker, pid, .. } => format!("fork {worker} {pid}"),
            Event::Listening { worker, addr, .. } => format!("listening {worker} {addr}"),
            Event::Exit {
                worker,
                code,
                signal,
                ..
            } => format!(
                "exit {worker} {}",
                code.or(signal).map_or("?".to_owned(), |c| c.to_string())
            ),
            Event::Stopped { .. } => break,
            _ => continue,
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    match master.wait() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mini-master: {e}");
            ExitCode::FAILURE
        }
    }
}
