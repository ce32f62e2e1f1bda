//! A hyper 1.x server (hyper-util's tokio glue) that runs standalone or as a cluster-rs
//! worker: the listener is the one changed line; the shutdown watch is optional.
//!
//! ```text
//! target/release/examples/hyper_hello 127.0.0.1:3000
//! cluster-cli spawn -n 2 -- target/release/examples/hyper_hello 127.0.0.1:3000
//! ```
use std::convert::Infallible;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

async fn hello(_: Request<Incoming>) -> Result<Response<String>, Infallible> {
    Ok(Response::new("Hello, World!".to_owned()))
}

fn main() -> std::io::Result<()> {
    // Optional (`#[tokio::main]` works too): one runtime thread per worker process under a
    // master, where the processes are the parallelism; multi-thread standalone.
    cluster_worker::tokio::runtime()?.block_on(serve())
}

async fn serve() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    // Was: let listener = tokio::net::TcpListener::bind(addr).await?;
    let listener = cluster_worker::tokio::TcpListener::bind(addr).await?;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _peer) = tokio::select! {
            conn = listener.accept() => match conn {
                Ok(conn) => conn,
                // The worker stops: the master gives new connections to others.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => break,
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            },
            () = cluster_worker::tokio::disconnected() => break,
        };
        connections.spawn(async move {
            let served = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(hello))
                .await;
            if let Err(e) = served {
                eprintln!("connection: {e}");
            }
        });
    }
    // In-flight connections finish before the process exits 0.
    while connections.join_next().await.is_some() {}
    Ok(())
}
