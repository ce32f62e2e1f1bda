//! A blocking std server (a thread per connection) that runs standalone or as a cluster-rs
//! worker: `cluster_worker::listen` replaces `TcpListener::bind`, `incoming()` stays.
//!
//! ```text
//! target/release/examples/std_hello 127.0.0.1:3000
//! cluster-cli spawn -n 2 -- target/release/examples/std_hello 127.0.0.1:3000
//! ```
use std::io::{BufRead, BufReader, Write};

use cluster_worker::{ListenSpec, Stream};

fn handle(stream: Stream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    // The request line and headers, up to the blank line.
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let body = "Hello, World!";
    write!(
        reader.get_mut(),
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    // Was: let listener = std::net::TcpListener::bind(addr)?;
    let listener = cluster_worker::listen(ListenSpec::tcp(addr.parse()?))?;
    let mut handlers = Vec::new();
    // Ends when the master asks the worker to stop (standalone: never).
    for conn in listener.incoming() {
        let (stream, _info) = conn?;
        handlers.push(std::thread::spawn(move || handle(stream)));
        handlers.retain(|h| !h.is_finished());
    }
    for h in handlers {
        let _ = h.join();
    }
    Ok(())
}
