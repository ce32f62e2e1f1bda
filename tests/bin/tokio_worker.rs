//! An axum app on `cluster_worker::tokio`: `tokio-worker ADDR`. Under a master it listens
//! through it, alone it binds for real. One runtime thread, so anything that blocked it
//! would show as unanswered hand-offs. `GET /` answers at once; `GET /slow/MS` sleeps MS
//! milliseconds (asynchronously) first and prints `slow begins` when it starts.
//!
//! `tokio-worker ADDR slow-accept MS`: no axum; an accept loop that sleeps MS before each
//! accept and writes `worker ID pid PID` to each client (the raw worker's line), ending when
//! `disconnected()` resolves (awaited on another task), then waiting for its connections.
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: tokio-worker ADDR");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let slow_accept = match std::env::args().nth(2).as_deref() {
        Some("slow-accept") => std::env::args().nth(3).and_then(|ms| ms.parse().ok()),
        _ => None,
    };
    let served = match slow_accept {
        Some(ms) => runtime.block_on(serve_slowly(&addr, Duration::from_millis(ms))),
        None => runtime.block_on(serve(&addr)),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serve: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(addr: &str) -> std::io::Result<()> {
    let id = cluster_worker::worker_id().map_or(0, |w| w.0);
    let header = move || [("x-worker-id", id.to_string())];
    let app = Router::new()
        .route("/", get(move || async move { (header(), "hello\n") }))
        .route(
            "/slow/{ms}",
            get(move |Path(ms): Path<u64>| async move {
                println!("slow begins");
                let _ = std::io::stdout().flush();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                (header(), "slow hello\n")
            }),
        );
    let listener = cluster_worker::tokio::TcpListener::bind(addr).await?;
    // Tests wait on this line instead of polling the port.
    println!("listening {}", listener.local_addr()?);
    let _ = std::io::stdout().flush();
    axum::serve(listener, app)
        .with_graceful_shutdown(cluster_worker::tokio::disconnected())
        .await?;
    eprintln!("worker {id} leaving");
    Ok(())
}

async fn serve_slowly(addr: &str, pause: Duration) -> std::io::Result<()> {
    let id = cluster_worker::worker_id().map_or(0, |w| w.0);
    let pid = std::process::id();
    let listener = cluster_worker::tokio::TcpListener::bind(addr).await?;
    println!("listening {}", listener.local_addr()?);
    let _ = std::io::stdout().flush();
    let mut connections = tokio::task::JoinSet::new();
    // The stop is awaited on its own task, as axum's graceful shutdown does: it must be woken
    // when the last answered connection is taken, and not resolve before.
    let (stopped, mut stop) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        cluster_worker::tokio::disconnected().await;
        let _ = stopped.send(());
    });
    loop {
        tokio::time::sleep(pause).await;
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {
                let _ = (&mut stop).await;
                break;
            }
            Err(e) => return Err(e),
        };
        connections.spawn(async move {
            let _ = stream
                .write_all(format!("worker {id} pid {pid}\n").as_bytes())
                .await;
            let mut bye = [0u8; 8];
            let _ = stream.read(&mut bye).await;
        });
    }
    while connections.join_next().await.is_some() {}
    eprintln!("worker {id} leaving");
    Ok(())
}
