//! Async servers as workers, on the tokio runtime (feature `tokio`; `axum` adds
//! `axum::serve::Listener` impls).
//!
//! [`TcpListener::bind`] replaces `tokio::net::TcpListener::bind`: in a worker it asks the
//! master for the server without blocking the runtime, standalone it binds for real, so one
//! binary runs both ways. Its [`accept`](TcpListener::accept) returns tokio streams,
//! non-blocking and registered with the runtime. An axum app changes one line:
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
//! let listener = cluster_worker::tokio::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(cluster_worker::tokio::disconnected())
//!     .await
//! # }
//! ```
//!
//! **How connections arrive.** For a shared or reuse-port grant the worker accepts on the
//! master's socket, through the runtime's own `tokio::net` listener. For a round-robin grant
//! the master hands connections over the channel: a task on the runtime reads the channel
//! whenever the reactor reports it readable and answers each hand-off as it arrives (no
//! thread, and no wait on the application: a slow handler or a slow accept loop delays no
//! answer). Up to [`ACCEPT_BACKLOG`] answered connections wait for `accept`; beyond that the
//! master gives them to other workers. A connection is returned
//! only once its `Accepted` is written.
//!
//! **Stopping.** When the master asks the worker to stop (its SIGTERM, a reload), hand-offs
//! are refused from then on, `accept` returns what was already answered and then fails with
//! [`io::ErrorKind::ConnectionAborted`], and [`disconnected`] resolves once nothing answered is
//! left to accept (and, under axum, once axum has read from every connection it was given: see
//! `ServedStream`, feature `axum`): pass it to `with_graceful_shutdown`, let in-flight requests
//! finish, and return from `main` (exit 0).
//!
//! **Which runtime.** Any runtime with its IO and time drivers works (`#[tokio::main]` has
//! both; without them `bind` fails with [`io::ErrorKind::Unsupported`]). Under a master the
//! parallelism is the worker processes (one per core by default), so one runtime thread per
//! process is the fastest shape: [`runtime`] builds that under a master and tokio's
//! multi-thread runtime standalone. A listener may outlive the runtime it was bound
//! on: its next accept on another runtime reads the channel there.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
#[cfg(feature = "axum")]
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use ::tokio::net::{self as tnet, ToSocketAddrs};
use cluster_core::{BoundAddr, ListenAddr, ListenSpec};

use crate::link::{Link, Room, State, Taker, reactor};
use crate::listener::{Listener, Sock};
use crate::stream::Stream;
use crate::worker::Worker;

/// A runtime with every driver, shaped for where the process runs: under a master a
/// current-thread runtime, standalone tokio's multi-thread one. Setting
/// `TOKIO_WORKER_THREADS` asks for the multi-thread runtime in both cases.
///
/// Under a master the cluster supplies the parallelism (a process per core), and a second
/// runtime thread per process only adds wake-ups between threads on a core that another
/// worker needs: on 2 cores the axum example under `cluster-cli spawn -n 2` served about 10 %
/// more keep-alive and 20 % more `Connection: close` requests per second this way than with
/// `#[tokio::main]`, at two thirds of the CPU per connection (docs/benchmarks.md). As on any
/// current-thread runtime, `tokio::task::block_in_place` is not available; `spawn_blocking` is.
///
/// That thread yields its core before it goes to sleep for want of work. A worker shares its
/// core with the other workers, the master, and whatever feeds it on the same host (a proxy,
/// a load generator); what runs in the yield often writes the very requests this thread would
/// otherwise sleep for, and then it finds them without a sleep and a wake-up (the dearest part
/// of a request on a virtualized host). With nothing else to run the yield costs one system
/// call. Measured on 2 cores with wrk on the same host: the axum example under
/// `cluster-cli spawn -n 2` went from 0.85x to 1.16-1.23x (two runs) the keep-alive requests
/// per second of the same app standalone, at 7.4-7.6 instead of 9.2 µs of CPU per request;
/// with the server and wrk on separate cores it changed nothing (docs/benchmarks.md).
///
/// ```no_run
/// fn main() -> std::io::Result<()> {
///     cluster_worker::tokio::runtime()?.block_on(async {
///         let listener = cluster_worker::tokio::TcpListener::bind("127.0.0.1:3000").await?;
///         # drop(listener);
///         Ok(())
///     })
/// }
/// ```
pub fn runtime() -> io::Result<::tokio::runtime::Runtime> {
    let one_thread = crate::is_worker() && std::env::var_os("TOKIO_WORKER_THREADS").is_none();
    let mut builder = if one_thread {
        ::tokio::runtime::Builder::new_current_thread()
    } else {
        ::tokio::runtime::Builder::new_multi_thread()
    };
    if one_thread {
        builder.on_thread_park(std::thread::yield_now);
    }
    builder.enable_all().build()
}

/// Connections a worker holds answered (`Accepted` sent) for its tokio listeners until they
/// are accepted, counted over all its listeners; beyond it hand-offs are refused and the master
/// offers them to another worker. The bound plays the part of a standalone server's `listen(2)`
/// backlog (Node's default is 511): an async accept loop takes connections in bursts as the
/// runtime schedules it, and a small bound would refuse, under load, connections this worker
/// would have served a moment later (the blocking listeners' [`crate::ACCEPT_QUEUE`] of 16 is
/// for accept loops that take one connection at a time).
pub const ACCEPT_BACKLOG: usize = 512;

/// A TCP listener on the runtime: through the master in a worker, bound here otherwise.
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// let listener = cluster_worker::tokio::TcpListener::bind("127.0.0.1:8080").await?;
/// loop {
///     let (stream, peer) = listener.accept().await?;
///     stream.writable().await?;
///     let _ = stream.try_write(format!("hello {peer}\n").as_bytes());
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct TcpListener {
    core: Core<tnet::TcpListener>,
    addr: SocketAddr,
}

/// A Unix-socket listener on the runtime: through the master in a worker, bound here
/// otherwise.
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// let listener = cluster_worker::tokio::UnixListener::bind("/tmp/app.sock").await?;
/// let (stream, _peer) = listener.accept().await?;
/// # drop(stream);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct UnixListener {
    core: Core<tnet::UnixListener>,
}

impl TcpListener {
    /// Listens on the first of `addr`'s addresses that works (as
    /// `tokio::net::TcpListener::bind` does); see [`TcpListener::listen`].
    pub async fn bind<A: ToSocketAddrs>(addr: A) -> io::Result<TcpListener> {
        let mut last = None;
        for a in tnet::lookup_host(addr).await? {
            match TcpListener::listen(ListenSpec::tcp(a)).await {
                Ok(l) => return Ok(l),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "no address to listen on")
        }))
    }

    /// Listens on `spec` (backlog, `exclusive`, `ipv6_only`...): in a worker the master binds
    /// it, or says which error it met (`EADDRINUSE` is [`io::ErrorKind::AddrInUse`]); the wait
    /// yields to the runtime and ends at the listen timeout (30 s). Standalone, or for an
    /// `exclusive` spec, it binds here.
    pub async fn listen(spec: ListenSpec) -> io::Result<TcpListener> {
        TcpListener::listen_on(crate::worker()?, spec).await
    }

    /// [`TcpListener::listen`] through `worker`, or here when `None`.
    pub(crate) async fn listen_on(
        worker: Option<Worker>,
        spec: ListenSpec,
    ) -> io::Result<TcpListener> {
        let grant = listen_through_master(worker, spec).await?;
        let addr = match grant.local_addr() {
            BoundAddr::Inet(a) => a,
            BoundAddr::Unix(_) => return Err(wrong_kind("TCP")),
        };
        let core = Core::new(grant, |sock| match sock {
            Sock::Tcp(l) => {
                let l = l.try_clone()?;
                l.set_nonblocking(true)?;
                tnet::TcpListener::from_std(l)
            }
            _ => Err(wrong_kind("TCP")),
        })?;
        Ok(TcpListener { core, addr })
    }

    /// Waits for the next connection. Fails with [`io::ErrorKind::ConnectionAborted`] once
    /// the worker stops and nothing answered is left (see the module docs), and with
    /// [`io::ErrorKind::UnexpectedEof`] when the master is gone.
    pub async fn accept(&self) -> io::Result<(tnet::TcpStream, SocketAddr)> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for the next connection; see [`TcpListener::accept`].
    pub fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(tnet::TcpStream, SocketAddr)>> {
        self.poll_accept_marked(cx, false)
            .map_ok(|(accepted, _unmarked)| accepted)
    }

    /// [`TcpListener::poll_accept`]; with `mark`, under a master, the stream comes with its
    /// [`FirstRead`] (see `ServedStream`).
    fn poll_accept_marked(
        &self,
        cx: &mut Context<'_>,
        mark: bool,
    ) -> Marked<(tnet::TcpStream, SocketAddr)> {
        self.core.poll_accept_with(
            cx,
            mark,
            |io, cx| io.poll_accept(cx),
            |(stream, peer)| match stream {
                Stream::Tcp(s) => {
                    // The master sends every TCP peer's address with the hand-off.
                    let peer = peer.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                    // Handed-off streams arrive non-blocking (see `Message::NewConn`).
                    tnet::TcpStream::from_std(s).map(|s| (s, peer))
                }
                Stream::Unix(_) => Err(wrong_kind("TCP")),
            },
        )
    }

    /// The address the server is bound to (the real port for port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

impl UnixListener {
    /// Listens on the Unix socket at `path`; see [`TcpListener::listen`].
    pub async fn bind(path: impl AsRef<Path>) -> io::Result<UnixListener> {
        UnixListener::listen(ListenSpec::unix(path.as_ref())).await
    }

    /// Listens on `spec`; see [`TcpListener::listen`].
    pub async fn listen(spec: ListenSpec) -> io::Result<UnixListener> {
        let grant = listen_through_master(crate::worker()?, spec).await?;
        let core = Core::new(grant, |sock| match sock {
            Sock::Unix(l) => {
                let l = l.try_clone()?;
                l.set_nonblocking(true)?;
                tnet::UnixListener::from_std(l)
            }
            _ => Err(wrong_kind("Unix")),
        })?;
        Ok(UnixListener { core })
    }

    /// Waits for the next connection; see [`TcpListener::accept`].
    pub async fn accept(&self) -> io::Result<(tnet::UnixStream, tnet::unix::SocketAddr)> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for the next connection; see [`TcpListener::accept`].
    pub fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(tnet::UnixStream, tnet::unix::SocketAddr)>> {
        self.poll_accept_marked(cx, false)
            .map_ok(|(accepted, _unmarked)| accepted)
    }

    /// As [`TcpListener::poll_accept_marked`].
    fn poll_accept_marked(
        &self,
        cx: &mut Context<'_>,
        mark: bool,
    ) -> Marked<(tnet::UnixStream, tnet::unix::SocketAddr)> {
        self.core.poll_accept_with(
            cx,
            mark,
            |io, cx| io.poll_accept(cx),
            |(stream, _)| match stream {
                Stream::Unix(s) => tnet::UnixStream::from_std(s).and_then(|s| {
                    let peer = s.peer_addr()?;
                    Ok((s, peer))
                }),
                Stream::Tcp(_) => Err(wrong_kind("Unix")),
            },
        )
    }

    /// The address the server is bound to.
    pub fn local_addr(&self) -> io::Result<tnet::unix::SocketAddr> {
        match &self.core.io {
            Some(io) => io.local_addr(),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a round-robin grant has no socket; see listen_addr()",
            )),
        }
    }

    /// The path the server is bound to, under every policy.
    pub fn listen_addr(&self) -> BoundAddr {
        self.core.grant.local_addr()
    }
}

/// A future that resolves when the master asks this worker to stop (or the worker asked,
/// or the master is gone), once every connection already answered for a tokio listener has
/// been accepted and, for the axum listeners, read from by axum (its graceful shutdown would
/// otherwise close unserved a connection whose request it has not read yet; see
/// `ServedStream`, feature `axum`): give it to `with_graceful_shutdown`. Standalone it never
/// resolves: combine it with your own signal handling.
///
/// ```no_run
/// # async fn run(listener: cluster_worker::tokio::TcpListener, app: axum::Router) -> std::io::Result<()> {
/// axum::serve(listener, app)
///     .with_graceful_shutdown(cluster_worker::tokio::disconnected())
///     .await
/// # }
/// ```
pub async fn disconnected() {
    disconnected_of(global_link()).await;
}

async fn disconnected_of(link: Option<Arc<Link>>) {
    let Some(link) = link else {
        return std::future::pending().await;
    };
    if link.ensure_channel_task().is_err() {
        // Outside a runtime nothing could ever wake this future.
        return std::future::pending().await;
    }
    poll_fn(|cx| {
        let mut st = link.lock();
        if st.stopped_and_emptied() {
            return Poll::Ready(());
        }
        st.wake_on_stop(cx);
        Poll::Pending
    })
    .await;
}

/// The next message from the master; `None` once the master is gone (and at once
/// standalone).
///
/// ```no_run
/// # async fn run() {
/// while let Some(msg) = cluster_worker::tokio::recv().await {
///     eprintln!("the master says {}", String::from_utf8_lossy(&msg));
/// }
/// # }
/// ```
pub async fn recv() -> Option<Vec<u8>> {
    recv_of(global_link()).await
}

async fn recv_of(link: Option<Arc<Link>>) -> Option<Vec<u8>> {
    let link = link?;
    link.ensure_channel_task().ok()?;
    poll_fn(|cx| {
        let mut st = link.lock();
        if let Some(msg) = st.next_user() {
            return Poll::Ready(Some(msg));
        }
        if st.channel_closed() {
            return Poll::Ready(None);
        }
        st.wake_on_change(cx);
        Poll::Pending
    })
    .await
}

/// Sends a message to the master. Never blocks: what the socket does not take at once the
/// channel task writes when it can. Fails with [`io::ErrorKind::NotConnected`] standalone.
pub fn send(payload: Vec<u8>) -> io::Result<()> {
    match crate::worker()? {
        Some(w) => w.send(payload),
        None => Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "not a worker: there is no master to send to",
        )),
    }
}

fn global_link() -> Option<Arc<Link>> {
    crate::worker().ok().flatten().map(|w| w.link().clone())
}

fn wrong_kind(want: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("the server is not a {want} server"),
    )
}

/// Asks the master for the server (without blocking the runtime), or binds here.
async fn listen_through_master(worker: Option<Worker>, spec: ListenSpec) -> io::Result<Listener> {
    if matches!(spec.addr, ListenAddr::Udp(_)) {
        return Err(wrong_kind("stream"));
    }
    reactor::check_time_driver()?;
    match worker {
        Some(w) if !spec.exclusive => {
            let granted = w.link().query_async(&spec).await?;
            w.adopt_grant(granted)
        }
        _ => Listener::bind_standalone(&spec),
    }
}

/// What a listener is, whatever the socket type.
#[derive(Debug)]
struct Core<L> {
    /// The real socket on the runtime; `None` for a round-robin grant.
    io: Option<L>,
    /// Keeps the master's server open (its drop sends `Close`), and for a round-robin grant
    /// names the inbox.
    grant: Listener,
    link: Option<Arc<Link>>,
    /// `Listening` was sent (at the first accept, as for the blocking listener).
    started: AtomicBool,
}

enum Source<'a, L> {
    Socket(&'a L),
    Taken((Stream, Option<SocketAddr>)),
}

impl<L> Core<L> {
    fn new(grant: Listener, on_runtime: impl FnOnce(&Sock) -> io::Result<L>) -> io::Result<Self> {
        let link = grant.link().cloned();
        let io = match &grant.sock {
            Sock::RoundRobin { .. } => None,
            sock => Some(reactor::with_drivers(|| on_runtime(sock))?),
        };
        if let Some(link) = &link {
            // Reads the channel from now on: a disconnect must reach accept and
            // `disconnected` even on a shared socket.
            link.ensure_channel_task()?;
        }
        Ok(Core {
            io,
            grant,
            link,
            started: AtomicBool::new(false),
        })
    }

    /// The next connection: accepted on the real socket with `accept`, or taken from the
    /// inbox and made the runtime's with `convert`.
    fn poll_accept_with<T>(
        &self,
        cx: &mut Context<'_>,
        mark: bool,
        accept: impl FnOnce(&L, &mut Context<'_>) -> Poll<io::Result<T>>,
        convert: impl FnOnce((Stream, Option<SocketAddr>)) -> io::Result<T>,
    ) -> Marked<T> {
        match self.poll_source(cx, mark) {
            Poll::Ready(Ok((Source::Socket(io), first_read))) => {
                accept(io, cx).map_ok(|accepted| (accepted, first_read))
            }
            Poll::Ready(Ok((Source::Taken(taken), first_read))) => {
                Poll::Ready(convert(taken).map(|accepted| (accepted, first_read)))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Where the next connection comes from: the real socket, or (round-robin) a stream
    /// taken from the inbox, answered and written. With `mark`, under a master, a
    /// [`FirstRead`] for it, counted under the lock that took it (for the socket, before its
    /// accept: dropped unused if nothing is accepted).
    fn poll_source(&self, cx: &Context<'_>, mark: bool) -> Marked<Source<'_, L>> {
        let (Some(link), Some(server)) = (&self.link, self.grant.server()) else {
            return match &self.io {
                Some(io) => Poll::Ready(Ok((Source::Socket(io), None))),
                None => Poll::Ready(Err(wrong_kind("listening"))),
            };
        };
        if !self.started.load(Ordering::Acquire) {
            let room: Room = Arc::new(|parked| parked < ACCEPT_BACKLOG);
            link.lock()
                .start_taking(server, &self.grant.local_addr(), Taker::Reactor, room)?;
            self.started.store(true, Ordering::Release);
        }
        let mut st = link.lock();
        if !st.channel_task_running() && !st.channel_closed() {
            // The runtime that ran it was dropped with its tasks: nobody answers hand-offs
            // (the master would drop the worker) until a task reads on this one.
            drop(st);
            link.ensure_channel_task()?;
            st = link.lock();
        }
        let first_read = |st: &mut State| mark.then(|| FirstRead::new(st, link));
        if let Some(io) = &self.io {
            // Once the worker stops, other workers take what waits in the shared backlog.
            if let Err(e) = st.still_taking() {
                return Poll::Ready(Err(e));
            }
            st.wake_on_stop(cx);
            let first_read = first_read(&mut st);
            return Poll::Ready(Ok((Source::Socket(io), first_read)));
        }
        match st.take_answered(server) {
            Ok(Some((stream, info))) => {
                st.note_taken();
                let first_read = first_read(&mut st);
                Poll::Ready(Ok((Source::Taken((stream, info.peer)), first_read)))
            }
            Ok(None) => {
                st.wake_on_change(cx);
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<L> Core<L> {
    /// True once the worker stopped taking connections (a listener's errors are then final).
    #[cfg(feature = "axum")]
    fn stopped(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|link| link.lock().still_taking().is_err())
    }
}

/// What axum's `serve` does with an accept error: a stopped worker waits for the graceful
/// shutdown; out of fds, back off (as axum's own listener does) instead of spinning; a
/// client that left before its accept is skipped.
#[cfg(feature = "axum")]
async fn after_accept_error(e: io::Error, stopped: bool) {
    // Only the stop's own error means nothing more will come; any other (a stream the runtime
    // could not register, say) is retried, so the streams still parked get taken and
    // `disconnected()` can resolve.
    let stop = matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::UnexpectedEof
    );
    if stopped && stop {
        return std::future::pending().await;
    }
    if crate::sys::is_resource_exhaustion(&e) {
        ::tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    } else if stopped {
        // Not a spin while an error repeats during the stop.
        ::tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[cfg(feature = "axum")]
impl axum::serve::Listener for TcpListener {
    type Io = ServedStream<tnet::TcpStream>;
    type Addr = SocketAddr;

    /// Retries what can be retried; once the worker stops it never resolves, so the serve
    /// ends through `with_graceful_shutdown(disconnected())`.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match poll_fn(|cx| self.poll_accept_marked(cx, true)).await {
                Ok(((stream, peer), first_read)) => {
                    return (ServedStream { stream, first_read }, peer);
                }
                Err(e) => after_accept_error(e, self.core.stopped()).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        TcpListener::local_addr(self)
    }
}

#[cfg(feature = "axum")]
impl axum::serve::Listener for UnixListener {
    type Io = ServedStream<tnet::UnixStream>;
    type Addr = tnet::unix::SocketAddr;

    /// As for [`TcpListener`].
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match poll_fn(|cx| self.poll_accept_marked(cx, true)).await {
                Ok(((stream, peer), first_read)) => {
                    return (ServedStream { stream, first_read }, peer);
                }
                Err(e) => after_accept_error(e, self.core.stopped()).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        UnixListener::local_addr(self)
    }
}

/// What an accept polled with a mark returns.
type Marked<T> = Poll<io::Result<(T, Option<FirstRead>)>>;

/// A stream counted in the state (see [`State::hand_to_server`]) until the server it was
/// handed to reads from it or drops it.
#[derive(Debug)]
struct FirstRead(Arc<Link>);

impl FirstRead {
    fn new(st: &mut State, link: &Arc<Link>) -> FirstRead {
        st.hand_to_server();
        FirstRead(link.clone())
    }
}

impl Drop for FirstRead {
    fn drop(&mut self) {
        self.0.lock().first_read();
    }
}

/// A connection as the `axum::serve::Listener` impls give it to axum: the tokio stream
/// (reads and writes go straight to it), which tells [`disconnected`] when axum first reads
/// from it.
///
/// axum's graceful shutdown cancels every connection whose HTTP version hyper has not read
/// yet, even when its request is there: a connection handed over just before (or, answered
/// earlier, taken after) the master's stop would be closed unserved if `disconnected`
/// resolved at once. It resolves only once axum has read from every connection it was given,
/// so every request that had arrived is served. (One that arrives after axum first looked
/// is cancelled, as on an idle keep-alive connection, standalone or not.)
#[cfg(feature = "axum")]
#[derive(Debug)]
pub struct ServedStream<S> {
    stream: S,
    first_read: Option<FirstRead>,
}

#[cfg(feature = "axum")]
impl<S> ServedStream<S> {
    /// The tokio stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The tokio stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The tokio stream, no longer watched for `disconnected`.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

#[cfg(feature = "axum")]
impl<S: ::tokio::io::AsyncRead + AsFd + Unpin> ::tokio::io::AsyncRead for ServedStream<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ::tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        // Pending on a new stream often means only that the reactor has not reported it yet:
        // if the request is there, it is read when it does, and counted then.
        if self.first_read.is_some()
            && (read.is_ready() || !crate::sys::has_unread_input(self.stream.as_fd()))
        {
            self.first_read = None;
        }
        read
    }
}

#[cfg(feature = "axum")]
impl<S: ::tokio::io::AsyncWrite + Unpin> ::tokio::io::AsyncWrite for ServedStream<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;
