//! The hello HTTP worker on the real worker runtime: `hello-worker ADDR [drain_ms]`.
//! Under a master it listens through it; alone it binds for real.
use std::process::ExitCode;
use std::time::Duration;

use cluster_hello::HelloFactory;
use cluster_worker::{Handler, ListenSpec, ServeConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let addr = match args.get(1).map(|a| a.parse()) {
        Some(Ok(a)) => a,
        _ => {
            eprintln!("usage: hello-worker ADDR [drain_ms]");
            return ExitCode::from(2);
        }
    };
    let drain = args
        .get(2)
        .and_then(|d| d.parse().ok())
        .map(Duration::from_millis);
    let id = cluster_worker::worker_id().map_or(0, |w| w.0);
    let listener = match cluster_worker::listen(ListenSpec::tcp(addr)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("listen: {e}");
            return ExitCode::from(3);
        }
    };
    // Tests wait on this line instead of polling the port.
    println!("listening {}", listener.local_addr());
    // Sessions inline on the serve loop: one thread per process, like Node, on any machine.
    let mut config = ServeConfig::new().threads(0);
    if let Some(d) = drain {
        config = config.drain_timeout(d);
    }
    match cluster_worker::serve(
        vec![listener],
        Handler::sessions(HelloFactory::new(id)),
        config,
    ) {
        Ok(outcome) => {
            eprintln!("worker {id} leaving: {outcome:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("serve: {e}");
            ExitCode::FAILURE
        }
    }
}
