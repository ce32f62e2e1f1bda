//! [`Worker`]: this process's connection to its master, as the application holds it.

use std::io;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use cluster_core::{ListenAddr, ListenSpec, Message, ServerGrant, WorkerId, env};
use cluster_ipc::{Channel, Limits};

use crate::handler::Handler;
use crate::link::Link;
use crate::listener::{Listener, Sock};
use crate::serve::{ServeConfig, ServeOutcome};
use crate::sys;

/// This process's connection to its master: listens through it, serves the connections it
/// hands over, exchanges user messages. Cheap to clone (all clones are one worker).
#[derive(Clone, Debug)]
pub struct Worker {
    link: Arc<Link>,
}

impl Worker {
    /// A worker talking to its master over `channel`. Sends `Online`. For tests and
    /// embedders; a worker process uses [`crate::worker`].
    ///
    /// ```
    /// use cluster_ipc::Channel;
    /// use cluster_worker::{Worker, WorkerId};
    ///
    /// let (mut master, ours) = Channel::pair()?;
    /// let worker = Worker::with_channel(ours, WorkerId(1))?;
    /// assert_eq!(master.recv_blocking(None)?.msg, cluster_core::Message::Online);
    /// assert_eq!(worker.id(), WorkerId(1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_channel(channel: Channel, id: WorkerId) -> io::Result<Worker> {
        Ok(Worker {
            link: Arc::new(Link::new(channel, id)?),
        })
    }

    /// The worker described by this process's environment (`CLUSTER_RS_WORKER_ID`,
    /// `CLUSTER_RS_CHANNEL_FD`), or `None` when the process is not a worker.
    ///
    /// Adopts the inherited channel fd, which can happen once per process: a second call
    /// fails with [`io::ErrorKind::AlreadyExists`]. The process-global worker of
    /// [`crate::worker`] is this call's result; use that unless you need the worker before
    /// (or instead of) it.
    ///
    /// ```no_run
    /// if let Some(worker) = cluster_worker::Worker::from_env()? {
    ///     eprintln!("worker {:?}", worker.id());
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn from_env() -> io::Result<Option<Worker>> {
        let Some(id) = std::env::var_os(env::WORKER_ID) else {
            return Ok(None);
        };
        let bad = |e: cluster_core::CoreError| io::Error::new(io::ErrorKind::InvalidInput, e);
        let id = env::parse_worker_id(&id.to_string_lossy()).map_err(bad)?;
        let fd = match std::env::var_os(env::CHANNEL_FD) {
            Some(v) => env::parse_channel_fd(&v.to_string_lossy()).map_err(bad)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is set but {} is not", env::WORKER_ID, env::CHANNEL_FD),
                ));
            }
        };
        let chan = Channel::from_inherited_fd(fd, Limits::default())?;
        Worker::with_channel(chan, id).map(Some)
    }

    /// This worker's id.
    pub fn id(&self) -> WorkerId {
        self.link.id()
    }

    /// True until the channel to the master has closed (EOF, error, or the end of a serve).
    pub fn is_connected(&self) -> bool {
        self.link.is_connected()
    }

    /// How long [`Worker::listen`] and [`Worker::bind_udp`] wait for the master's answer
    /// (30 s unless set). A grant that arrives after the wait gave up is closed at once; a
    /// retry sent before that `Close` reaches the master can still be refused with
    /// `EADDRINUSE`, as the master then counts this worker among the server's holders.
    pub fn set_listen_timeout(&self, timeout: Duration) {
        self.link.set_listen_timeout(timeout);
    }

    /// Listens on `spec`: through the master, or in this process for `exclusive` specs.
    ///
    /// Blocks until the master answers (at most the listen timeout, 30 s by default). The
    /// master's bind error comes back as an `io::Error` of the same kind (`EADDRINUSE` is
    /// [`io::ErrorKind::AddrInUse`]). [`crate::listen`] does the same, or binds for real in a
    /// process that is not a worker.
    ///
    /// ```no_run
    /// use cluster_worker::ListenSpec;
    ///
    /// if let Some(worker) = cluster_worker::worker()? {
    ///     let listener = worker.listen(ListenSpec::tcp("0.0.0.0:8080".parse()?))?;
    ///     eprintln!("listening on {}", listener.local_addr());
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn listen(&self, spec: ListenSpec) -> io::Result<Listener> {
        if spec.addr.is_udp() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "listen() is for stream sockets; use bind_udp() for UDP",
            ));
        }
        if spec.exclusive {
            return Listener::bind_exclusive(&spec, self.link.clone());
        }
        let granted = self.link.query(&spec)?;
        self.adopt_grant(granted)
    }

    /// The listener for what the master granted.
    pub(crate) fn adopt_grant(&self, granted: crate::link::Grant) -> io::Result<Listener> {
        let (server, addr, grant, mut fds) = granted;
        let sock = match grant {
            ServerGrant::RoundRobin => Ok(Sock::RoundRobin { signal: None }),
            ServerGrant::Shared | ServerGrant::ReusePort => fds
                .pop()
                .ok_or_else(missing_fd)
                .and_then(Sock::from_listening_fd),
        };
        match sock {
            Ok(sock) => Ok(Listener::granted(
                sock,
                self.link.clone(),
                server,
                grant,
                addr,
            )),
            Err(e) => {
                // Granted but unusable here: the master must not count us as listening.
                self.link.lock().close_server(server);
                Err(e)
            }
        }
    }

    /// Binds a UDP socket: through the master (always shared, as in Node), in this process when
    /// `exclusive`.
    ///
    /// The returned socket is a plain std socket, so closing it does not tell the master: the
    /// server stays registered (and its index in use) for the life of the worker.
    /// [`crate::bind_udp`] does the same, or binds for real in a process that is not a worker.
    ///
    /// ```no_run
    /// use cluster_worker::ListenSpec;
    ///
    /// if let Some(worker) = cluster_worker::worker()? {
    ///     let socket = worker.bind_udp(ListenSpec::udp("0.0.0.0:5353".parse()?))?;
    ///     let mut buf = [0u8; 1500];
    ///     let (n, from) = socket.recv_from(&mut buf)?;
    ///     socket.send_to(&buf[..n], from)?;
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn bind_udp(&self, spec: ListenSpec) -> io::Result<UdpSocket> {
        let ListenAddr::Udp(addr) = spec.addr else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bind_udp needs a UDP address",
            ));
        };
        if spec.exclusive {
            return sys::bind_udp(&addr, spec.ipv6_only);
        }
        let (server, _addr, _grant, mut fds) = self.link.query(&spec)?;
        match fds.pop() {
            Some(fd) => Ok(UdpSocket::from(fd)),
            None => {
                self.link.lock().close_server(server);
                Err(missing_fd())
            }
        }
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Sends an application message to the master. Never blocks; usable from any thread.
    ///
    /// ```no_run
    /// if let Some(worker) = cluster_worker::worker()? {
    ///     worker.send(b"ready".to_vec())?;
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn send(&self, payload: Vec<u8>) -> io::Result<()> {
        self.link.lock().send(&Message::User { payload })
    }

    /// User messages that arrived while no serve loop was running to deliver them, oldest
    /// first.
    ///
    /// At most [`USER_QUEUE`](crate::USER_QUEUE) are kept between calls: when more arrive,
    /// the oldest are dropped (counted by [`messages_dropped`](Self::messages_dropped)), so a
    /// master that sends faster than the application takes cannot exhaust the worker's memory.
    pub fn take_messages(&self) -> Vec<Vec<u8>> {
        let mut st = self.link.lock();
        st.pump();
        st.take_user()
    }

    /// How many user messages were dropped, over the worker's life, because more than
    /// [`USER_QUEUE`](crate::USER_QUEUE) waited for [`take_messages`](Self::take_messages).
    pub fn messages_dropped(&self) -> u64 {
        self.link.lock().user_dropped()
    }

    /// Leaves the cluster gracefully: tells the master (`ExitedAfterDisconnect`, so the exit is
    /// not a crash) and makes a running serve drain and return
    /// [`ServeOutcome::WorkerDisconnect`].
    ///
    /// ```no_run
    /// if let Some(worker) = cluster_worker::worker()? {
    ///     worker.disconnect()?;
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn disconnect(&self) -> io::Result<()> {
        self.link.disconnect()
    }

    /// Serves `listeners` until disconnected (see the crate docs' theory of operation).
    ///
    /// ```no_run
    /// use cluster_worker::{ConnInfo, Handler, ListenSpec, ServeConfig, Stream};
    ///
    /// if let Some(worker) = cluster_worker::worker()? {
    ///     let listener = worker.listen(ListenSpec::tcp("127.0.0.1:8080".parse()?))?;
    ///     let handler = Handler::blocking(|_s: Stream, _: ConnInfo| {});
    ///     let outcome = worker.serve(vec![listener], handler, ServeConfig::new())?;
    ///     eprintln!("leaving: {outcome:?}");
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn serve(
        &self,
        listeners: Vec<Listener>,
        handler: Handler,
        config: ServeConfig,
    ) -> io::Result<ServeOutcome> {
        crate::serve::run(Some(&self.link), listeners, handler, config)
    }
}

#[cfg(test)]
impl Worker {
    /// For tests that reach into the shared state (named apart from the tokio module's
    /// `link()`, which is compiled only with that feature).
    pub(crate) fn test_link(&self) -> &Arc<Link> {
        &self.link
    }
}

fn missing_fd() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "grant arrived without its socket",
    )
}
