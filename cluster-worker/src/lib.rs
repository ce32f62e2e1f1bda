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
//! accepts on it. Dropping a granted [`Listener`] sends `Close`; hand-offs that arrive later
//! are refused (`ListenerClosed`).
//!
//! **`Listening`.** The worker tells the master a server is `Listening` only when it starts
//! taking connections on it: when [`serve`] starts, at the first [`Listener::accept`] /
//! [`Listener::try_accept`], or when it is registered in a caller's mio `Poll`. The master
//! hands off round-robin connections only after that, so a worker that listens but never
//! serves has nothing stuck in flight.
//!
//! **Answering is the runtime's job.** Whatever API takes the connections, whoever reads the
//! channel answers each hand-off as it arrives, in one function, before any client byte is
//! read (hazard A12): a taken connection is parked, `Accepted` queued, in its server's bounded
//! inbox; the application gets it only once that answer is written (the answers of one read
//! leave in one `sendmsg`). Under [`serve`] the loop reads the channel; for listeners the
//! application drives itself ([`Listener::accept`], [`Listener::incoming`],
//! [`Listener::try_accept`] from its own `Poll`) an *answerer* thread reads it while such a
//! listener is open, so a slow accept loop never delays an answer past the master's ack
//! timeout. The answers:
//! - `Refused(FdLost)`: the frame came without its fd, or the fd is not a stream socket;
//! - `Refused(Draining)`: the worker is disconnecting;
//! - `Refused(ListenerClosed)`: the server is not open in this worker (never was, or closed);
//! - `Refused(FdLimit)`: the received fd's number is within 32 of the soft `RLIMIT_NOFILE`
//!   (the kernel hands out the lowest free fd, so its number is a cheap count, hazard A2);
//! - `Refused(MaxConnections)`: no room: under [`serve`], `max_connections` connections are
//!   open, the blocking queue is full or every session thread died; for an application's
//!   listener, [`ACCEPT_QUEUE`] connections wait for it;
//! - otherwise `Accepted`.
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
//! its first `on_ready` leaves it open. [`Handler::blocking`] runs a function per connection
//! on `threads` pool threads fed by a queue whose bound is checked before answering.
//! [`Worker::send`] may be called from any thread, inline sessions included: it queues on the
//! channel and wakes the loop if the socket could not take it at once.
//!
//! **Real sockets.** A refused fd is closed at once; the master kept its own copy and re-routes
//! it. On real
//! listening sockets (shared grants, standalone, exclusive) the loop accepts until
//! `WouldBlock`; at capacity it leaves connections in the kernel backlog for other workers and
//! looks again 10 ms later; `EMFILE`/`ENFILE` back off 100 ms instead of spinning (hazard C1).
//!
//! **Drain.** Triggered by `Disconnect` from the master, [`Worker::disconnect`] in the worker (which
//! first sends `ExitedAfterDisconnect`), channel EOF or a broken channel (the master is gone,
//! hazard D4), or a [`Shutdown`] trigger. The worker refuses every hand-off with `Draining`,
//! sends `Close` for its servers, closes its listening sockets, calls [`Session::on_drain`] on
//! every session (idle keep-alive connections close there), and waits for open connections,
//! and for connections answered `Accepted` whose answers are still being written (they are
//! served, never dropped), up to `drain_timeout` (30 s by default). Then it closes what is left, flushes and closes the
//! channel, and [`serve`] returns a [`ServeOutcome`] saying why. A worker binary then exits 0.
//!
//! **Standalone.** With no master, [`serve`] just accepts on the real sockets; stop it with a
//! [`Shutdown`] trigger.
//!
//! UDP: [`bind_udp`] returns a plain `std::net::UdpSocket` (shared by the master, as in Node),
//! so its server is never closed in the master while the worker lives.
//!
//! **Async.** With the `tokio` feature, [`tokio`] has listeners on the runtime's reactor
//! (`cluster_worker::tokio::TcpListener::bind(addr).await`), `disconnected()` for graceful
//! shutdown and async user messages; with `axum` they implement `axum::serve::Listener`. For
//! any other runtime the blocking [`Listener`] of a shared or reuse-port grant gives its
//! socket ([`Listener::as_socket_fd`]) or converts into a `std::net::TcpListener`; a
//! round-robin grant has no socket.
//!
//! **Modules.** Dependencies point one way: `lib` (the free functions) → `worker`
//! ([`Worker`]) → `serve` (the loop) → `listener` ([`Listener`]) → `link` (the shared channel
//! state, the one answering function, the answerer thread); `serve` → `pool` (handler
//! threads; it sizes the serve's inbox `Room`, a `link` type) → `sessions` (the session slab)
//! → `shared` (the pool's counters); `handler`, `stream` (what handlers see) and `sys` (OS
//! calls) are leaves.
#![warn(missing_docs)]
#![deny(unsafe_code)]

mod handler;
mod link;
mod listener;
mod pool;
mod serve;
mod sessions;
mod shared;
mod stream;
mod sys;
#[cfg(feature = "tokio")]
pub mod tokio;
mod worker;

use std::io;
use std::net::UdpSocket;
use std::sync::OnceLock;

pub use cluster_core::{BoundAddr, ListenAddr, ListenSpec, ServerGrant, ServerId, WorkerId};
pub use handler::{ConnInfo, Handler, Next, Session, SessionFactory};
pub use link::USER_QUEUE;
pub use listener::{ACCEPT_QUEUE, Incoming, Listener};
pub use serve::{ServeConfig, ServeOutcome, Shutdown};
pub use stream::Stream;
pub use worker::Worker;

/// True when this process was started as a worker (`CLUSTER_RS_WORKER_ID` is set); false in
/// a master or a standalone server.
///
/// ```
/// if !cluster_worker::is_worker() {
///     println!("running alone");
/// }
/// ```
pub fn is_worker() -> bool {
    std::env::var_os(cluster_core::env::WORKER_ID).is_some()
}

/// This worker's id from the environment, without adopting the channel; `None` in a process
/// that is not a worker or when malformed.
///
/// ```
/// let id = cluster_worker::worker_id().map_or(0, |w| w.0);
/// println!("hello from worker {id}");
/// ```
pub fn worker_id() -> Option<WorkerId> {
    let v = std::env::var_os(cluster_core::env::WORKER_ID)?;
    cluster_core::env::parse_worker_id(&v.to_string_lossy()).ok()
}

static GLOBAL: OnceLock<Result<Option<Worker>, (io::ErrorKind, String)>> = OnceLock::new();

/// The process-global worker: adopted from the environment on first use (sending `Online`),
/// `None` when the process is not a worker. A failed adoption is reported on every call.
/// Everything a worker does beyond [`listen`], [`bind_udp`] and [`serve`] is a method of it.
///
/// ```no_run
/// if let Some(worker) = cluster_worker::worker()? {
///     worker.send(b"hello, master".to_vec())?;
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn worker() -> io::Result<Option<Worker>> {
    let got = GLOBAL.get_or_init(|| Worker::from_env().map_err(|e| (e.kind(), e.to_string())));
    match got {
        Ok(w) => Ok(w.clone()),
        Err((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
    }
}

/// Listens on `spec`: through the master in a worker ([`Worker::listen`]), bound in this
/// process otherwise.
///
/// ```no_run
/// use cluster_worker::ListenSpec;
///
/// let listener = cluster_worker::listen(ListenSpec::tcp("127.0.0.1:0".parse()?))?;
/// println!("listening on {}", listener.local_addr());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn listen(spec: ListenSpec) -> io::Result<Listener> {
    match worker()? {
        Some(w) => w.listen(spec),
        None => Listener::bind_standalone(&spec),
    }
}

/// Binds a UDP socket: shared by the master in a worker ([`Worker::bind_udp`]), bound in
/// this process otherwise.
///
/// ```no_run
/// use cluster_worker::ListenSpec;
///
/// let socket = cluster_worker::bind_udp(ListenSpec::udp("127.0.0.1:5353".parse()?))?;
/// let mut buf = [0u8; 1500];
/// let (n, from) = socket.recv_from(&mut buf)?;
/// socket.send_to(&buf[..n], from)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn bind_udp(spec: ListenSpec) -> io::Result<UdpSocket> {
    match worker()? {
        Some(w) => w.bind_udp(spec),
        None => match spec.addr {
            ListenAddr::Udp(addr) => sys::bind_udp(&addr, spec.ipv6_only),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bind_udp needs a UDP address",
            )),
        },
    }
}

/// Serves `listeners` with `handler` until the worker is disconnected or its master is gone
/// ([`Worker::serve`]), or, standalone, until the config's [`Shutdown`] is triggered. See the
/// crate-level example.
pub fn serve(
    listeners: Vec<Listener>,
    handler: Handler,
    config: ServeConfig,
) -> io::Result<ServeOutcome> {
    match worker()? {
        Some(w) => w.serve(listeners, handler, config),
        None => serve::run(None, listeners, handler, config),
    }
}

#[cfg(test)]
mod conversion_tests;
#[cfg(test)]
mod tests;
