//! The cluster-rs worker runtime: the worker half of Node's `cluster`.
//!
//! A server becomes a worker by changing one line: call [`listen`] (instead of binding a
//! `TcpListener` itself) and [`serve`]. In a process started by a cluster-rs master the
//! listen goes through the master; in any other process it binds for real, so the same binary
//! runs standalone.
//!
//! ```no_run
//! use cluster_worker::{ConnInfo, Handler, ListenSpec, ServeConfig, Stream};
//! use std::io::Write;
//!
//! let listener = cluster_worker::listen(ListenSpec::tcp("127.0.0.1:8080".parse()?))?;
//! let handler = Handler::blocking(|mut s: Stream, _: ConnInfo| {
//!     let _ = s.write_all(b"hello\n");
//! });
//! let outcome = cluster_worker::serve(vec![listener], handler, ServeConfig::new())?;
//! eprintln!("leaving: {outcome:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Theory of operation
//!
//! **Role.** A process is a worker when `CLUSTER_RS_WORKER_ID` is set. The first call that
//! needs the master ([`worker`], [`listen`], [`serve`], ...) adopts the channel fd named by
//! `CLUSTER_RS_CHANNEL_FD` exactly once (a process-global `OnceLock`) and sends `Online`.
//! Tests and embedders build a [`Worker`] directly from a channel with [`Worker::with_channel`].
//!
//! **Listen.** `exclusive` specs bind in the worker (Node semantics). Others send
//! `QueryServer{seq, spec, index}`, where `index` is the smallest index not used by this
//! worker's open servers on the same address (so close + listen again reuses 0, and every
//! worker's n-th `listen(0)` shares one port), and block up to 30 s for the reply with that
//! `seq`. Whatever else arrives meanwhile (hand-offs, user messages, `Disconnect`) is queued,
//! never lost. A round-robin grant has no socket: connections arrive as `NewConn`. A shared or
//! reuse-port grant carries the master's socket, already bound *and listening*; the worker only
//! accepts on it. Dropping a granted [`Listener`] sends `Close` and refuses (with
//! `ListenerClosed`) any hand-off still unanswered for it.
//!
//! **`Listening`.** The worker tells the master a server is `Listening` only when it starts
//! taking connections on it: when [`serve`] starts, at the first [`Listener::accept`] /
//! [`Listener::try_accept`], or when it is registered in a caller's mio `Poll`. The master
//! hands off round-robin connections only after that, so a worker that listens but never
//! serves has nothing stuck in flight.
//!
//! **Threads.** [`serve`] runs on the caller's thread: one mio loop owning the channel and the
//! listening sockets. [`Handler::sessions`] (event-driven [`Session`]s, honouring
//! [`Next::WakeAt`]) run either *inline*, in that loop's own `Poll` (`threads(0)`; the default
//! under a master, which runs one worker per CPU as Node does, and on machines with at most 2
//! CPUs), or round-robin over `threads` session threads, each with its own `Poll`, fed over a
//! crossbeam channel and woken through a mio `Waker` only when parked in `poll`. Both use one
//! bookkeeping structure: sessions in a slab whose tokens carry a generation (so a socket can
//! be closed without `epoll_ctl(DEL)`: late events for a reused slot are recognised as stale),
//! a ready list, and a min-heap of wake times; a session is registered in the `Poll` only if
//! its first `on_ready` leaves it open. [`Handler::blocking`] runs a function per connection on
//! `threads` pool threads fed by a bounded queue. [`Worker::send`] may be called from any
//! thread, inline sessions included: it queues on the channel and wakes the loop if the socket
//! could not take it at once.
//!
//! **The loop.** When the channel has an event it drains it until `WouldBlock`
//! (edge-triggered), then answers every queued `NewConn` at once, before any client byte is
//! read (hazard A12); the answers of one pass are queued and leave in one `sendmsg`, and the
//! accepted connections reach their handlers only after that flush:
//! - `Refused(ListenerClosed)`: the server is not open in this worker (never was, or closed);
//! - `Refused(Draining)`: the worker is disconnecting;
//! - `Refused(MaxConnections)`: `max_connections` connections are open, or the blocking
//!   queue is full;
//! - `Refused(FdLimit)`: the received fd's number is within 32 of the soft `RLIMIT_NOFILE`
//!   (the kernel hands out the lowest free fd, so its number is a cheap count, hazard A2);
//! - otherwise `Accepted`, and the stream goes to its handler (inline or on a thread).
//!
//! A refused fd is closed at once; the master kept its own copy and re-routes it. On real
//! listening sockets (shared grants, standalone, exclusive) the loop accepts until
//! `WouldBlock`; at capacity it leaves connections in the kernel backlog for other workers and
//! looks again 10 ms later; `EMFILE`/`ENFILE` back off 100 ms instead of spinning (hazard C1).
//!
//! **Drain.** Triggered by `Disconnect` from the master, [`disconnect`] in the worker (which
//! first sends `ExitedAfterDisconnect`), channel EOF or a broken channel (the master is gone,
//! hazard D4), or a [`Shutdown`] trigger. The worker refuses every hand-off with `Draining`,
//! sends `Close` for its servers, closes its listening sockets, calls [`Session::on_drain`] on
//! every session (idle keep-alive connections close there), and waits for open connections up
//! to `drain_timeout` (30 s by default). Then it closes what is left, flushes and closes the
//! channel, and [`serve`] returns a [`ServeOutcome`] saying why. A worker binary then exits 0.
//!
//! **Standalone.** With no master, [`serve`] just accepts on the real sockets; stop it with a
//! [`Shutdown`] trigger.
//!
//! UDP: [`bind_udp`] returns a plain `std::net::UdpSocket` (shared by the master, as in Node),
//! so its server is never closed in the master while the worker lives.
#![warn(missing_docs)]
#![deny(unsafe_code)]

mod handler;
mod listener;
mod pool;
mod serve;
mod sessions;
mod stream;
mod sys;
mod worker;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::OnceLock;

pub use cluster_core::{BoundAddr, ListenAddr, ListenSpec, ServerGrant, ServerId, WorkerId};
pub use handler::{Conn, ConnInfo, Next, Session, SessionFactory};
pub use listener::{Incoming, Listener};
pub use serve::{Handler, ServeConfig, ServeOutcome, Shutdown};
pub use stream::Stream;
pub use worker::Worker;

/// True when this process was started as a worker (`CLUSTER_RS_WORKER_ID` is set).
pub fn is_worker() -> bool {
    std::env::var_os(cluster_core::env::WORKER_ID).is_some()
}

/// True when this process is not a worker (a master, or a standalone server).
pub fn is_primary() -> bool {
    !is_worker()
}

/// This worker's id from the environment; `None` in a primary or when malformed.
pub fn worker_id() -> Option<WorkerId> {
    let v = std::env::var_os(cluster_core::env::WORKER_ID)?;
    cluster_core::env::parse_worker_id(&v.to_string_lossy()).ok()
}

static GLOBAL: OnceLock<Result<Option<Worker>, (io::ErrorKind, String)>> = OnceLock::new();

/// The process-global worker: adopted from the environment on first use (sending `Online`),
/// `None` when the process is not a worker. A failed adoption is reported on every call.
pub fn worker() -> io::Result<Option<Worker>> {
    let got = GLOBAL.get_or_init(|| Worker::from_env().map_err(|e| (e.kind(), e.to_string())));
    match got {
        Ok(w) => Ok(w.clone()),
        Err((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
    }
}

/// Listens on `spec`: through the master in a worker, bound in this process otherwise.
pub fn listen(spec: ListenSpec) -> io::Result<Listener> {
    match worker()? {
        Some(w) => w.listen(spec),
        None => Listener::bind_standalone(&spec),
    }
}

/// Binds a UDP socket: shared by the master in a worker, bound in this process otherwise.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    match worker()? {
        Some(w) => w.bind_udp(addr),
        None => sys::bind_udp(&addr, false),
    }
}

/// Serves `listeners` with `handler` until the worker is disconnected or its master is gone
/// (or, standalone, until the config's [`Shutdown`] is triggered).
pub fn serve(
    listeners: Vec<Listener>,
    handler: Handler,
    config: ServeConfig,
) -> io::Result<ServeOutcome> {
    match worker()? {
        Some(w) => w.serve(listeners, handler, config),
        None => serve::run_standalone(listeners, handler, config),
    }
}

/// Sends an application message to the master. `NotConnected` when there is no master.
pub fn send(payload: Vec<u8>) -> io::Result<()> {
    match worker()? {
        Some(w) => w.send(payload),
        None => Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "not a cluster worker",
        )),
    }
}

/// Leaves the cluster gracefully (see [`Worker::disconnect`]); nothing to do without a master.
pub fn disconnect() -> io::Result<()> {
    match worker()? {
        Some(w) => w.disconnect(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
