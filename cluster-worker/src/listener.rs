use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use cluster_core::{BoundAddr, ListenAddr, ListenSpec, ServerGrant, ServerId};
use mio::event::Source;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::handler::ConnInfo;
use crate::link::{self, Link, Taker, WAIT_SLICE};
use crate::stream::Stream;
use crate::sys::{self, StreamFd};

/// Connections the worker holds answered (`Accepted` sent) for the listeners the application
/// drives itself until it takes them, counted over all of the worker's listeners together;
/// beyond it hand-offs are refused (`MaxConnections`) and the master gives them to another
/// worker.
pub const ACCEPT_QUEUE: usize = 16;

/// Where a listener's connections come from.
#[derive(Debug)]
pub(crate) enum Sock {
    /// A real listening TCP socket (standalone, exclusive, or granted by the master).
    Tcp(TcpListener),
    /// A real listening Unix socket.
    Unix(UnixListener),
    /// Connections arrive as `NewConn` frames on the channel and wait, answered, in the
    /// server's inbox. `signal` is the readiness source for a caller's mio `Poll`: the link
    /// writes to its other end whenever something changed.
    RoundRobin { signal: Option<UnixStream> },
}

impl Sock {
    /// Wraps a listening socket the master sent (shared or reuse-port grant). The master has
    /// bound it *and* called `listen(2)` with the backlog: the worker only accepts.
    pub(crate) fn from_listening_fd(fd: OwnedFd) -> io::Result<Sock> {
        Ok(match sys::classify(fd)? {
            StreamFd::Tcp(fd) => Sock::Tcp(TcpListener::from(fd)),
            StreamFd::Unix(fd) => Sock::Unix(UnixListener::from(fd)),
        })
    }

    /// The readiness source: the listening socket, or a round-robin listener's signal.
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Sock::Tcp(l) => Some(l.as_fd()),
            Sock::Unix(l) => Some(l.as_fd()),
            Sock::RoundRobin { signal } => signal.as_ref().map(AsFd::as_fd),
        }
    }

    pub(crate) fn raw_fd(&self) -> Option<i32> {
        self.fd().map(|fd| fd.as_raw_fd())
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Sock::Tcp(l) => l.set_nonblocking(on),
            Sock::Unix(l) => l.set_nonblocking(on),
            Sock::RoundRobin { .. } => Ok(()),
        }
    }

    /// One `accept4(2)` on a real socket. The stream is non-blocking, as every stream the
    /// serve loop runs is (a handed-off one arrives so); blocking callers switch it back.
    pub(crate) fn accept_local(&self, server: Option<ServerId>) -> io::Result<(Stream, ConnInfo)> {
        match self {
            Sock::Tcp(l) => {
                let (fd, peer) = cluster_ipc::accept_nonblocking(l.as_fd())?;
                Ok((Stream::Tcp(TcpStream::from(fd)), ConnInfo { server, peer }))
            }
            Sock::Unix(l) => {
                let (fd, _) = cluster_ipc::accept_nonblocking(l.as_fd())?;
                Ok((
                    Stream::Unix(UnixStream::from(fd)),
                    ConnInfo { server, peer: None },
                ))
            }
            Sock::RoundRobin { .. } => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a round-robin listener has no socket to accept on",
            )),
        }
    }
}

/// A listening server: a real socket, or a round-robin grant whose connections the master
/// hands over on the channel.
///
/// Dropping it under a master sends `Close` for its server and refuses anything still in
/// flight to it, so the master re-routes those connections.
#[derive(Debug)]
pub struct Listener {
    pub(crate) sock: Sock,
    link: Option<Arc<Link>>,
    server: Option<ServerId>,
    grant: Option<ServerGrant>,
    addr: BoundAddr,
}

impl Listener {
    /// Binds for real in this process (no master, or `exclusive`).
    pub(crate) fn bind_standalone(spec: &ListenSpec) -> io::Result<Listener> {
        let sock = match &spec.addr {
            ListenAddr::Tcp(a) => {
                let listener = sys::bind_tcp(a, spec.ipv6_only, spec.backlog)?;
                if spec.defer_accept {
                    cluster_ipc::set_tcp_defer_accept(
                        listener.as_fd(),
                        cluster_ipc::DEFER_ACCEPT_SECONDS,
                    )
                    .map_err(|e| io::Error::new(e.kind(), format!("TCP_DEFER_ACCEPT: {e}")))?;
                }
                Sock::Tcp(listener)
            }
            ListenAddr::Unix(p) => Sock::Unix(sys::bind_unix(p, spec.backlog)?),
            ListenAddr::Udp(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "listen() is for stream sockets; use bind_udp() for UDP",
                ));
            }
            ListenAddr::Fd(fd) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("listen on fd {fd} needs a master (it names the master's fd)"),
                ));
            }
        };
        let addr = match &sock {
            Sock::Tcp(l) => BoundAddr::Inet(l.local_addr()?),
            Sock::Unix(_) => match &spec.addr {
                ListenAddr::Unix(p) => BoundAddr::Unix(p.clone()),
                _ => BoundAddr::Unix(Default::default()),
            },
            Sock::RoundRobin { .. } => BoundAddr::Unix(Default::default()),
        };
        Ok(Listener {
            sock,
            link: None,
            server: None,
            grant: None,
            addr,
        })
    }

    /// Binds for real in this process (`exclusive`) for a worker under a master: the link
    /// lets a blocking accept end when the worker disconnects; there is no server to close.
    pub(crate) fn bind_exclusive(spec: &ListenSpec, link: Arc<Link>) -> io::Result<Listener> {
        let mut listener = Listener::bind_standalone(spec)?;
        listener.link = Some(link);
        Ok(listener)
    }

    pub(crate) fn granted(
        sock: Sock,
        link: Arc<Link>,
        server: ServerId,
        grant: ServerGrant,
        addr: BoundAddr,
    ) -> Listener {
        Listener {
            sock,
            link: Some(link),
            server: Some(server),
            grant: Some(grant),
            addr,
        }
    }

    /// The address the server is bound to (the real port for `listen(0)`).
    pub fn local_addr(&self) -> BoundAddr {
        self.addr.clone()
    }

    /// The master's id for this server; `None` for a listener bound in this process.
    pub fn server(&self) -> Option<ServerId> {
        self.server
    }

    /// How the master shares the server; `None` for a listener bound in this process.
    pub fn grant(&self) -> Option<ServerGrant> {
        self.grant
    }

    /// The link to the master of a granted listener.
    #[cfg(feature = "tokio")]
    pub(crate) fn link(&self) -> Option<&Arc<Link>> {
        self.link.as_ref()
    }

    /// For a serve loop: the master's server this listener stands for, which from now on the
    /// loop closes (the listener's drop no longer does), and its address.
    pub(crate) fn hand_to_serve(mut self) -> Option<(ServerId, BoundAddr)> {
        let server = self.server.take()?;
        Some((server, self.addr.clone()))
    }

    /// Tells the master, once, that this server takes connections, and for a round-robin
    /// grant opens its inbox with the answerer thread reading the channel for it.
    fn start_taking(&self) -> io::Result<()> {
        let (Some(link), Some(server)) = (&self.link, self.server) else {
            return Ok(());
        };
        let room: link::Room = Arc::new(|parked| parked < ACCEPT_QUEUE);
        link.lock()
            .start_taking(server, &self.addr, Taker::Application, room)?;
        if matches!(self.sock, Sock::RoundRobin { .. }) {
            link.ensure_answerer()?;
        }
        Ok(())
    }

    /// Waits for and returns the next connection.
    ///
    /// For a round-robin listener the connections were answered `Accepted` when they arrived
    /// (by a thread that reads the channel while the listener is open, whatever the pace of
    /// the calls; up to [`ACCEPT_QUEUE`] wait answered for the caller, beyond that the master
    /// gives them to other workers), and one is returned only once its answer is written. It
    /// fails with [`io::ErrorKind::ConnectionAborted`] once the worker is disconnecting and
    /// every connection answered for it has been returned, and with
    /// [`io::ErrorKind::UnexpectedEof`] when the master is gone. On a shared socket the wait
    /// also ends on those.
    ///
    /// Dropping the listener closes the connections already answered `Accepted` for it and
    /// not yet returned (as `close(2)` drops a backlog): the master has handed them over and
    /// will not give them to another worker. Take them all before dropping it to serve them.
    ///
    /// ```no_run
    /// use cluster_worker::ListenSpec;
    /// use std::io::Write;
    ///
    /// let listener = cluster_worker::listen(ListenSpec::tcp("127.0.0.1:8080".parse()?))?;
    /// let (mut stream, info) = listener.accept()?;
    /// writeln!(stream, "hello {:?}", info.peer)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn accept(&self) -> io::Result<(Stream, ConnInfo)> {
        self.start_taking()?;
        match (&self.sock, &self.link, self.server) {
            (Sock::RoundRobin { .. }, Some(link), Some(server)) => {
                let mut st = link.lock();
                loop {
                    if !st.answerer_running() {
                        // The answerer failed: read (and answer) here, or nobody does.
                        st.pump();
                    }
                    if let Some(got) = st.take_answered(server)? {
                        drop(st);
                        return in_blocking_mode(got);
                    }
                    if st.answerer_running() {
                        st.wait(WAIT_SLICE);
                        continue;
                    }
                    if st.has_unread() {
                        continue;
                    }
                    let want_write = st.has_pending_output();
                    drop(st);
                    sys::wait_channel(link.poll_fd(), want_write, WAIT_SLICE)?;
                    st = link.lock();
                }
            }
            _ => self.accept_local_blocking(),
        }
    }

    /// A blocking accept on a real socket. A granted socket is the master's open file, shared
    /// with every other worker, and so is its `O_NONBLOCK` flag: clearing it would make the
    /// other workers' event loops block in `accept` whenever this one wins the race. So the
    /// socket stays non-blocking and the wait is a `poll`, which under a master also watches
    /// the channel and wakes every [`WAIT_SLICE`] so that a disconnect ends the wait, however
    /// it is learnt.
    fn accept_local_blocking(&self) -> io::Result<(Stream, ConnInfo)> {
        self.sock.set_nonblocking(true)?;
        loop {
            let mut unread = false;
            if let Some(link) = &self.link {
                // A disconnect another thread read (an answerer, a serve loop) or recorded
                // (`Worker::disconnect`) leaves the channel silent: look before every accept.
                let mut st = link.lock();
                st.pump();
                st.still_taking()?;
                unread = st.has_unread();
            }
            match self.sock.accept_local(self.server) {
                Ok(got) => return in_blocking_mode(got),
                // Another worker took it, or the client left first: wait for the next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(e),
            }
            if unread {
                continue;
            }
            let Some(fd) = self.sock.fd() else {
                return Err(no_socket());
            };
            let Some(link) = &self.link else {
                sys::wait_readable(fd, Duration::from_secs(60))?;
                continue;
            };
            // In slices: what another thread records makes no fd readable here.
            sys::wait_listener_or_channel(fd, link.poll_fd(), WAIT_SLICE)?;
        }
    }

    /// Accepts without blocking: `WouldBlock` when nothing waits. Use after
    /// [`Source::register`]ing the listener in your own mio `Poll`; on each event call it until
    /// `WouldBlock` (edge-triggered). The stream is returned in blocking mode. A round-robin
    /// listener's connections were answered on arrival, as for [`accept`](Self::accept).
    ///
    /// ```no_run
    /// use cluster_worker::ListenSpec;
    /// use mio::{Events, Interest, Poll, Token};
    ///
    /// let mut listener = cluster_worker::listen(ListenSpec::tcp("127.0.0.1:8080".parse()?))?;
    /// let mut poll = Poll::new()?;
    /// poll.registry().register(&mut listener, Token(0), Interest::READABLE)?;
    /// let mut events = Events::with_capacity(16);
    /// loop {
    ///     poll.poll(&mut events, None)?;
    ///     loop {
    ///         match listener.try_accept() {
    ///             Ok((stream, _info)) => drop(stream),
    ///             Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
    ///             Err(e) => return Err(e.into()),
    ///         }
    ///     }
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn try_accept(&self) -> io::Result<(Stream, ConnInfo)> {
        self.start_taking()?;
        match (&self.sock, &self.link, self.server) {
            (Sock::RoundRobin { signal }, Some(link), Some(server)) => {
                // Before looking: whatever changes after the look writes a new edge.
                if let Some(signal) = signal {
                    link::drain_signal(signal);
                }
                let mut st = link.lock();
                st.pump();
                let got = st.take_answered(server)?;
                drop(st);
                in_blocking_mode(got.ok_or(io::ErrorKind::WouldBlock)?)
            }
            _ => {
                self.sock.set_nonblocking(true)?;
                in_blocking_mode(self.sock.accept_local(self.server)?)
            }
        }
    }

    /// Connections as they arrive ([`accept`](Self::accept) in a loop); ends (returns `None`)
    /// when the worker disconnects or the master is gone, under every policy. For a
    /// round-robin grant it ends only once every connection answered for it was returned:
    /// dropping the listener earlier closes the connections answered and not yet taken.
    ///
    /// ```no_run
    /// use cluster_worker::ListenSpec;
    /// use std::io::Write;
    ///
    /// let listener = cluster_worker::listen(ListenSpec::tcp("127.0.0.1:8080".parse()?))?;
    /// for conn in listener.incoming() {
    ///     let (mut stream, _info) = conn?;
    ///     stream.write_all(b"hello\n")?;
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming { listener: self }
    }

    /// Closes the server (the same as dropping it).
    pub fn close(self) {}
}

/// Handed-off sockets arrive non-blocking, and `accept_local` accepts non-blocking too;
/// blocking callers expect std's default.
fn in_blocking_mode((stream, info): (Stream, ConnInfo)) -> io::Result<(Stream, ConnInfo)> {
    stream.set_nonblocking(false)?;
    Ok((stream, info))
}

fn no_socket() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "the listener has no socket")
}

impl Drop for Listener {
    /// Under a master: sends `Close`, so the master stops handing over; connections already
    /// answered for this listener and not taken are closed, like a backlog on `close(2)`.
    fn drop(&mut self) {
        if let (Some(link), Some(server)) = (&self.link, self.server) {
            let mut st = link.lock();
            st.close_server(server);
            st.close_inbox(server);
        }
    }
}

impl Source for Listener {
    /// Registers the socket (for a round-robin grant, a socket the worker signals whenever
    /// connections are ready) for readability and tells the master the server is listening.
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.sock.set_nonblocking(true)?;
        self.start_taking()?;
        if let (Sock::RoundRobin { signal }, Some(link), Some(server)) =
            (&mut self.sock, &self.link, self.server)
            && signal.is_none()
        {
            let (ours, theirs) = UnixStream::pair()?;
            ours.set_nonblocking(true)?;
            theirs.set_nonblocking(true)?;
            *signal = Some(ours);
            link.lock().set_signal(server, theirs);
        }
        let Some(fd) = self.sock.raw_fd() else {
            return Err(no_socket());
        };
        SourceFd(&fd).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        let Some(fd) = self.sock.raw_fd() else {
            return Err(no_socket());
        };
        SourceFd(&fd).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        let Some(fd) = self.sock.raw_fd() else {
            return Err(no_socket());
        };
        SourceFd(&fd).deregister(registry)
    }
}

/// Iterator over [`Listener::accept`]; see [`Listener::incoming`].
#[derive(Debug)]
pub struct Incoming<'a> {
    listener: &'a Listener,
}

impl Iterator for Incoming<'_> {
    type Item = io::Result<(Stream, ConnInfo)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.listener.accept() {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::UnexpectedEof
                ) =>
            {
                None
            }
            other => Some(other),
        }
    }
}

impl Listener {
    /// The listening socket, for another event loop to watch: `Some` when bound here
    /// (standalone, `exclusive`) or granted shared or reuse-port, `None` for a round-robin
    /// grant, which has no socket in the worker (its connections come over the channel to the
    /// master; watch them by registering the listener in a mio `Poll`, or call
    /// [`accept`](Self::accept)).
    ///
    /// A granted socket is the master's open file, shared with the other workers, and so is
    /// its `O_NONBLOCK` flag: leave it non-blocking, wait for readability, then accept, and
    /// take `WouldBlock` to mean that another worker took the connection.
    pub fn as_socket_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.sock {
            Sock::Tcp(l) => Some(l.as_fd()),
            Sock::Unix(l) => Some(l.as_fd()),
            Sock::RoundRobin { .. } => None,
        }
    }

    /// The real socket, for another runtime or framework; the master's server stays open for
    /// the life of the worker (as for [`crate::bind_udp`]), counted as listening. A granted
    /// socket is the master's open file, shared with the other workers, and stays
    /// non-blocking: keep it so (see [`Listener::as_socket_fd`]); a blocking one would make
    /// every event loop sharing it block in `accept` whenever another worker won the race.
    /// Fails for a round-robin grant, which has no socket.
    fn into_socket(mut self) -> io::Result<Sock> {
        if matches!(self.sock, Sock::RoundRobin { .. }) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a round-robin grant has no socket: accept through the listener \
                 (or cluster_worker::tokio), or ask the master for a shared policy",
            ));
        }
        self.start_taking()?;
        self.server = None;
        self.link = None;
        Ok(std::mem::replace(
            &mut self.sock,
            Sock::RoundRobin { signal: None },
        ))
    }
}

impl TryFrom<Listener> for TcpListener {
    type Error = io::Error;

    /// The listening socket of a TCP listener bound here or granted shared or reuse-port
    /// (a round-robin grant has none). A granted one is non-blocking and must stay so: poll,
    /// then accept, and treat `WouldBlock` as another worker having taken the connection.
    ///
    /// ```no_run
    /// use cluster_worker::ListenSpec;
    ///
    /// let listener = cluster_worker::listen(ListenSpec::tcp("127.0.0.1:8080".parse()?))?;
    /// let std_listener = std::net::TcpListener::try_from(listener)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    fn try_from(listener: Listener) -> io::Result<TcpListener> {
        match listener.into_socket()? {
            Sock::Tcp(l) => Ok(l),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a TCP listener",
            )),
        }
    }
}

impl TryFrom<Listener> for UnixListener {
    type Error = io::Error;

    /// The listening socket of a Unix listener bound here or granted shared.
    fn try_from(listener: Listener) -> io::Result<UnixListener> {
        match listener.into_socket()? {
            Sock::Unix(l) => Ok(l),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a Unix listener",
            )),
        }
    }
}
