//! An axum app on `cluster_worker::tokio`: `tokio-worker ADDR`. Under a master it listens
//! through it, alone it binds for real. One runtime thread, so anything that blocked it
//! would show as unanswered hand-offs. `GET /` answers at once; `GET /slow/MS` sleeps MS
//! milliseconds (asynchronously) first and prints `slow begins` when it starts.
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;

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
    match runtime.block_on(serve(&addr)) {
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
