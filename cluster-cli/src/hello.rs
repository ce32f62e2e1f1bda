//! `cluster-cli hello`: the built-in hello HTTP worker
//! ([`cluster_hello::HelloFactory`]). The same code runs standalone (binds for real,
//! answers as worker 0) or as a worker of any cluster-rs master (listens through it).

use std::io::Write;
use std::net::SocketAddr;
use std::thread;

use cluster_core::ListenSpec;
use cluster_hello::HelloFactory;
use cluster_worker::{Handler, ServeConfig, Shutdown};
use signal_hook::consts::signal::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::args::HelloArgs;

pub fn run(a: HelloArgs) -> Result<(), String> {
    let under_master = cluster_worker::is_worker();
    let id = cluster_worker::worker_id().map_or(0, |w| w.0);
    let addr = SocketAddr::new(a.host, a.port);
    // HTTP clients speak first: with TCP_DEFER_ACCEPT a connection is accepted (or handed
    // to us) with its request already there, one wake-up instead of two.
    let listener = cluster_worker::listen(ListenSpec::tcp(addr).defer_accept(true))
        .map_err(|e| format!("hello: cannot listen on {addr}: {e}"))?;
    if !under_master {
        // Standalone, this line is the only way to learn the port of `--port 0`. Under a
        // master it would repeat the master's own `listening on` line.
        // A closed stdout must not stop the server, hence no `println!` (it panics on EPIPE).
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "hello worker listening on {}", listener.local_addr());
        let _ = out.flush();
    }

    let shutdown = Shutdown::new();
    let mut signals = Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("hello: cannot install signal handlers: {e}"))?;
    let trigger = shutdown.clone();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || on_signals(&mut signals, &trigger, under_master))
        .map_err(|e| format!("hello: cannot start the signal thread: {e}"))?;

    let mut config = ServeConfig::new().shutdown(&shutdown);
    if let Some(n) = a.threads {
        config = config.threads(n);
    }
    let handler = Handler::sessions(HelloFactory::new(id));
    cluster_worker::serve(vec![listener], handler, config)
        .map_err(|e| format!("hello: serve failed: {e}"))?;
    // Every outcome (the master disconnected us or is gone, or a stop signal) is a clean exit.
    Ok(())
}

fn on_signals(signals: &mut Signals, shutdown: &Shutdown, under_master: bool) {
    for sig in signals.forever() {
        if under_master {
            // Ctrl-C in a terminal sends INT to the whole process group, master included: the
            // master coordinates the stop (and drains us), so the worker leaves it to the
            // master instead of racing it.
            if sig == SIGINT {
                continue;
            }
            // TERM aimed at this worker: leave gracefully and tell the master it is planned
            // (Node's worker.disconnect()), so that it is not counted as a crash.
            let left = cluster_worker::worker().and_then(|w| match w {
                Some(w) => w.disconnect(),
                None => Err(std::io::ErrorKind::NotConnected.into()),
            });
            if left.is_err() {
                shutdown.trigger();
            }
        } else if shutdown.is_triggered() {
            // A second TERM/INT: the user does not want to wait for the drain.
            std::process::exit(1);
        } else {
            shutdown.trigger();
        }
    }
}
