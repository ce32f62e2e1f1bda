//! An axum app that runs standalone or as a cluster-rs worker; the only cluster-specific
//! lines are the listener and the graceful shutdown.
//!
//! ```text
//! cargo build --release -p cluster-examples --examples
//! target/release/examples/axum_hello 127.0.0.1:3000                      # standalone
//! cluster-cli spawn -n 2 -- target/release/examples/axum_hello 127.0.0.1:3000   # 2 workers
//! ```
use axum::Router;
use axum::routing::get;

fn main() -> std::io::Result<()> {
    // Optional (`#[tokio::main]` works too): one runtime thread per worker process under a
    // master, where the processes are the parallelism; multi-thread standalone.
    cluster_worker::tokio::runtime()?.block_on(serve())
}

async fn serve() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let app = Router::new().route("/", get(|| async { "Hello, World!" }));
    // Was: let listener = tokio::net::TcpListener::bind(addr).await?;
    let listener = cluster_worker::tokio::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        // Under a master: finish in-flight requests and exit 0 when asked to stop.
        .with_graceful_shutdown(cluster_worker::tokio::disconnected())
        .await
}
