use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use cluster_core::ServerId;

/// A client connection as an event-driven [`Session`] sees it: non-blocking, and (from the end
/// of its first `on_ready`, if that leaves it open) registered for both readable and writable,
/// edge-triggered, with the mio `Poll` that runs its session: the serve loop's when sessions
/// run inline, else its session thread's.
#[derive(Debug)]
pub enum Conn {
    /// A TCP client.
    Tcp(mio::net::TcpStream),
    /// A Unix-socket client.
    Unix(mio::net::UnixStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// Where a connection came from.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The server (listener) it arrived on; `None` for a standalone listener.
    pub server: Option<ServerId>,
    /// The client's address, for TCP.
    pub peer: Option<SocketAddr>,
}

/// What a session wants after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Call again on the next readiness event.
    Continue,
    /// Call again on the next readiness event or at this instant, whichever is first.
    WakeAt(Instant),
    /// Close the connection now.
    Close,
}

/// An event-driven connection handler: many idle connections cost no thread.
///
/// The runtime calls [`Session::on_ready`] when the connection may be readable or writable
/// (the socket is edge-triggered: read and write until `WouldBlock`), or when a requested wake
/// time has passed.
pub trait Session: Send + 'static {
    /// Make all the progress possible without blocking.
    fn on_ready(&mut self, conn: &mut Conn, now: Instant) -> io::Result<Next>;

    /// The worker is draining: finish what is in progress and close soon (for HTTP, answer
    /// the request being served with `Connection: close`, and close idle keep-alive
    /// connections). `on_ready` is called right after.
    fn on_drain(&mut self) {}
}

/// Creates a [`Session`] per accepted connection.
pub trait SessionFactory: Send + Sync + 'static {
    /// The session type.
    type Session: Session;
    /// A new session for a connection the worker just took.
    fn new_session(&self, info: &ConnInfo) -> Self::Session;
}

impl mio::event::Source for Conn {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.register(registry, token, interests),
            Conn::Unix(s) => s.register(registry, token, interests),
        }
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.reregister(registry, token, interests),
            Conn::Unix(s) => s.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.deregister(registry),
            Conn::Unix(s) => s.deregister(registry),
        }
    }
}
