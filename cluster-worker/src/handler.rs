//! What serves a connection: the [`Handler`] given to `serve`, and the [`Session`] trait of
//! event-driven handlers.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use cluster_core::ServerId;

use crate::stream::Stream;

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
/// (the socket is non-blocking and, from the end of its first `on_ready` if that leaves it
/// open, registered edge-triggered for both with the `Poll` that runs the session: read and
/// write until `WouldBlock`), or when a requested wake time has passed.
///
/// ```no_run
/// use cluster_worker::{ConnInfo, Handler, Next, Session, SessionFactory, Stream};
/// use std::io::{self, Read, Write};
/// use std::time::Instant;
///
/// struct Echo;
/// impl Session for Echo {
///     fn on_ready(&mut self, conn: &mut Stream, _now: Instant) -> io::Result<Next> {
///         let mut buf = [0u8; 4096];
///         loop {
///             match conn.read(&mut buf) {
///                 Ok(0) => return Ok(Next::Close),
///                 Ok(n) => conn.write_all(&buf[..n])?,
///                 Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Next::Continue),
///                 Err(e) => return Err(e),
///             }
///         }
///     }
/// }
///
/// struct Echoes;
/// impl SessionFactory for Echoes {
///     type Session = Echo;
///     fn new_session(&self, _info: &ConnInfo) -> Echo {
///         Echo
///     }
/// }
///
/// let handler = Handler::sessions(Echoes);
/// # drop(handler);
/// ```
pub trait Session: Send + 'static {
    /// Make all the progress possible without blocking. `conn` is non-blocking.
    fn on_ready(&mut self, conn: &mut Stream, now: Instant) -> io::Result<Next>;

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

pub(crate) type BlockingFn = Arc<dyn Fn(Stream, ConnInfo) + Send + Sync + 'static>;

/// An object-safe [`SessionFactory`].
pub(crate) trait DynFactory: Send + Sync + 'static {
    fn make(&self, info: &ConnInfo) -> Box<dyn Session>;
}

impl<F: SessionFactory> DynFactory for F {
    fn make(&self, info: &ConnInfo) -> Box<dyn Session> {
        Box::new(self.new_session(info))
    }
}

pub(crate) enum HandlerKind {
    Sessions(Arc<dyn DynFactory>),
    Blocking(BlockingFn),
}

/// What serves each connection.
pub struct Handler(pub(crate) HandlerKind);

impl Handler {
    /// Event-driven sessions, run by the serve loop itself or spread over session threads
    /// (see [`ServeConfig::threads`](crate::ServeConfig::threads)); see [`Session`].
    pub fn sessions<F: SessionFactory>(factory: F) -> Handler {
        Handler(HandlerKind::Sessions(Arc::new(factory)))
    }

    /// A blocking function per connection, run on a pool of
    /// [`ServeConfig::threads`](crate::ServeConfig::threads) threads fed through a queue of
    /// [`ServeConfig::queue`](crate::ServeConfig::queue) connections; see [`Stream`].
    pub fn blocking<F>(f: F) -> Handler
    where
        F: Fn(Stream, ConnInfo) + Send + Sync + 'static,
    {
        Handler(HandlerKind::Blocking(Arc::new(f)))
    }
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            HandlerKind::Sessions(_) => "Handler::Sessions",
            HandlerKind::Blocking(_) => "Handler::Blocking",
        })
    }
}
