use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use cluster_core::{
    BoundAddr, ListenAddr, ListenSpec, Message, RefuseReason, ServerGrant, ServerId,
};
use mio::event::Source;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::handler::ConnInfo;
use crate::stream::Stream;
use crate::sys::{self, StreamFd};
use crate::worker::Worker;

/// Where a listener's connections come from.
#[derive(Debug)]
pub(crate) enum Sock {
    /// A real listening TCP socket (standalone, exclusive, or granted by the master).
    Tcp(TcpListener),
    /// A real listening Unix socket.
    Unix(UnixListener),
    /// Connections arrive as `NewConn` frames on the channel; `poll_fd` is a dup of the channel
    /// socket, the readiness source for callers that bring their own mio `Poll`.
    RoundRobin { poll_fd: OwnedFd },
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

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Tcp(l) => l.as_fd(),
            Sock::Unix(l) => l.as_fd(),
            Sock::RoundRobin { poll_fd } => poll_fd.as_fd(),
        }
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.fd().as_raw_fd()
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Sock::Tcp(l) => l.set_nonblocking(on),
            Sock::Unix(l) => l.set_nonblocking(on),
            Sock::RoundRobin { .. } => Ok(()),
        }
    }

    /// One `accept(2)` on a real socket.
    pub(crate) fn accept_local(&self, server: Option<ServerId>) -> io::Result<(Stream, ConnInfo)> {
        match self {
            Sock::Tcp(l) => {
                let (s, peer) = l.accept()?;
                Ok((
                    Stream::Tcp(s),
                    ConnInfo {
                        server,
                        peer: Some(peer),
                    },
                ))
            }
            Sock::Unix(l) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), ConnInfo { server, peer: None }))
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
    pub(crate) worker: Option<Worker>,
    pub(crate) server: Option<ServerId>,
    grant: Option<ServerGrant>,
    addr: BoundAddr,
}

impl Listener {
    /// Binds for real in this process (no master, or `exclusive`).
    pub(crate) fn bind_standalone(spec: &ListenSpec) -> io::Result<Listener> {
        let sock = match &spec.addr {
            ListenAddr::Tcp(a) => Sock::Tcp(sys::bind_tcp(a, spec.ipv6_only, spec.backlog)?),
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
            worker: None,
            server: None,
            grant: None,
            addr,
        })
    }

    pub(crate) fn granted(
        sock: Sock,
        worker: Worker,
        server: ServerId,
        grant: ServerGrant,
        addr: BoundAddr,
    ) -> Listener {
        Listener {
            sock,
            worker: Some(worker),
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

    /// Tells the master that this server takes connections (once). The master starts handing
    /// off round-robin connections only after this.
    pub(crate) fn announce(&self) -> io::Result<()> {
        if let (Some(w), Some(server)) = (&self.worker, self.server) {
            w.inner.state.lock().mark_listening(server, &self.addr)?;
        }
        Ok(())
    }

    /// Waits for and returns the next connection.
    ///
    /// For a round-robin listener this reads the channel until the master hands over a
    /// connection for this server, answers `Accepted`, and returns it; it fails with
    /// [`io::ErrorKind::ConnectionAborted`] once the worker is disconnecting and with
    /// [`io::ErrorKind::UnexpectedEof`] when the master is gone.
    ///
    /// Nothing answers the master between calls: the other hand-offs in flight to this worker
    /// (up to the master's window) wait for the next call, and a worker that leaves one
    /// unanswered for the master's ack timeout (10 s by default) is dropped. A handler that
    /// may run that long belongs on another thread, or under [`crate::serve`], whose loop
    /// answers at once.
    pub fn accept(&self) -> io::Result<(Stream, ConnInfo)> {
        self.announce()?;
        match (&self.sock, &self.worker, self.server) {
            (Sock::RoundRobin { .. }, Some(w), Some(server)) => w.wait_for(None, |st| {
                if st.disconnect.is_some() || st.draining {
                    return Some(Err(disconnecting()));
                }
                self.take_rr(w, st, server).transpose()
            }),
            _ => self.accept_local_blocking(),
        }
    }

    /// A blocking accept on a real socket. A granted socket is the master's open file, shared
    /// with every other worker, and so is its `O_NONBLOCK` flag: clearing it would make the
    /// other workers' event loops block in `accept` whenever this one wins the race. So the
    /// socket stays non-blocking and the wait is a `poll`, which under a master also watches
    /// the channel so that a disconnect ends the wait.
    fn accept_local_blocking(&self) -> io::Result<(Stream, ConnInfo)> {
        self.sock.set_nonblocking(true)?;
        loop {
            match self.sock.accept_local(self.server) {
                Ok((s, info)) => {
                    s.set_nonblocking(false)?;
                    return Ok((s, info));
                }
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
            let fd = self.sock.fd();
            let Some(w) = &self.worker else {
                sys::wait_readable(fd, Duration::from_secs(60))?;
                continue;
            };
            if sys::wait_listener_or_channel(fd, w.channel_poll_fd())? {
                let mut st = w.inner.state.lock();
                if st.pump()
                    && let Some(waker) = &st.loop_waker
                {
                    // What arrived may be for a serve loop whose edge is now spent.
                    let _ = waker.wake();
                }
                still_taking(&st)?;
            }
        }
    }

    /// One hand-off for `server` out of the shared queue, answered. `Ok(None)` when none waits.
    fn take_rr(
        &self,
        w: &Worker,
        st: &mut crate::worker::State,
        server: ServerId,
    ) -> io::Result<Option<(Stream, ConnInfo)>> {
        while let Some((conn, fd)) = st.take_pending(server) {
            if w.over_fd_mark(&fd) {
                st.refuse(conn, RefuseReason::FdLimit);
                continue;
            }
            let (stream, peer) = match sys::stream_from_fd(fd) {
                Ok(got) => got,
                Err(_) => {
                    st.refuse(conn, RefuseReason::FdLost);
                    continue;
                }
            };
            st.send(&Message::Accepted { conn })?;
            // The master may have accepted it non-blocking; blocking callers expect std's
            // default.
            stream.set_nonblocking(false)?;
            return Ok(Some((
                stream,
                ConnInfo {
                    server: Some(server),
                    peer,
                },
            )));
        }
        Ok(None)
    }

    /// Accepts without blocking: `WouldBlock` when nothing waits. Use after
    /// [`Source::register`]ing the listener in your own mio `Poll`; on each event call it until
    /// `WouldBlock` (edge-triggered). The stream is returned in blocking mode.
    pub fn try_accept(&self) -> io::Result<(Stream, ConnInfo)> {
        self.announce()?;
        match (&self.sock, &self.worker, self.server) {
            (Sock::RoundRobin { .. }, Some(w), Some(server)) => {
                let mut st = w.inner.state.lock();
                st.pump();
                still_taking(&st)?;
                let got = self.take_rr(w, &mut st, server);
                st.flush();
                got?.ok_or_else(|| io::ErrorKind::WouldBlock.into())
            }
            _ => {
                self.sock.set_nonblocking(true)?;
                let (s, info) = self.sock.accept_local(self.server)?;
                s.set_nonblocking(false)?;
                Ok((s, info))
            }
        }
    }

    /// Connections as they arrive; ends when the worker disconnects or the master is gone.
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming { listener: self }
    }

    /// Closes the server (the same as dropping it).
    pub fn close(self) {}
}

/// Whether accepts may go on: not once the worker is disconnecting or the master is gone.
fn still_taking(st: &crate::worker::State) -> io::Result<()> {
    if st.disconnect.is_some() || st.draining {
        return Err(disconnecting());
    }
    if st.gone {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the master is gone",
        ));
    }
    Ok(())
}

fn disconnecting() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the worker is disconnecting",
    )
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let (Some(w), Some(server)) = (&self.worker, self.server) {
            w.inner.state.lock().close_server(server);
        }
    }
}

impl Source for Listener {
    /// Registers the socket (for a round-robin grant, the channel) for readability and tells
    /// the master the server is listening.
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.sock.set_nonblocking(true)?;
        SourceFd(&self.sock.raw_fd()).register(registry, token, interests)?;
        self.announce()
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        SourceFd(&self.sock.raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        SourceFd(&self.sock.raw_fd()).deregister(registry)
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
                ) && matches!(self.listener.sock, Sock::RoundRobin { .. }) =>
            {
                None
            }
            other => Some(other),
        }
    }
}
