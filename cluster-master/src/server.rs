//! The server table: one entry per [`ListenKey`], holding the master's socket and, for
//! round-robin, its [`RoundRobinHandle`].

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use cluster_core::{
    BoundAddr, ListenAddr, ListenError, ListenKey, ListenSpec, Peer, Policy, ServerGrant, ServerId,
    WorkerId,
};

use crate::bind::{self, BoundSocket};
use crate::round_robin::{Action, RoundRobinConfig, RoundRobinHandle};

/// A connection the master accepted and keeps until a worker answers for it.
#[derive(Debug)]
pub(crate) struct AcceptedConn {
    pub(crate) fd: OwnedFd,
    pub(crate) peer: Peer,
}

/// The master's accepting socket of a round-robin server.
#[derive(Debug)]
pub(crate) enum AcceptSocket {
    Tcp(std::net::TcpListener),
    Unix(UnixListener),
}

impl AcceptSocket {
    /// One `accept4` (non-blocking, close-on-exec), keeping the peer's address for the
    /// worker: see [`cluster_ipc::accept_nonblocking`].
    pub(crate) fn accept_conn(&self) -> io::Result<AcceptedConn> {
        match self {
            AcceptSocket::Tcp(l) => {
                let (fd, addr) = cluster_ipc::accept_nonblocking(l.as_fd())?;
                // The kernel always reports an inet peer for a TCP listener; were it ever to
                // report none, the unspecified address keeps the stream typed as TCP.
                let unknown = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
                let peer = Peer::Tcp(addr.unwrap_or(unknown));
                Ok(AcceptedConn { fd, peer })
            }
            AcceptSocket::Unix(l) => {
                let (fd, _) = cluster_ipc::accept_nonblocking(l.as_fd())?;
                Ok(AcceptedConn {
                    fd,
                    peer: Peer::Unix,
                })
            }
        }
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            AcceptSocket::Tcp(l) => l.as_fd(),
            AcceptSocket::Unix(l) => l.as_fd(),
        }
    }
}

#[derive(Debug)]
pub(crate) enum ServerKind {
    RoundRobin {
        socket: AcceptSocket,
        handle: Box<RoundRobinHandle<AcceptedConn>>,
        /// Accepting stopped before `WouldBlock` (backpressure or fd exhaustion): the
        /// edge-triggered listener will not report the connections already waiting, so the
        /// loop must try again itself.
        backlogged: bool,
        /// What the handle asked for while a worker's answers were being read (the
        /// hand-offs their freed windows allow), carried out once that read ends so that the
        /// connections one worker gets leave in one frame.
        after_answers: Vec<Action<AcceptedConn>>,
    },
    Shared {
        socket: OwnedFd,
    },
    ReusePort {
        /// The spec with the resolved port, to bind further slots' sockets.
        spec: ListenSpec,
        /// One socket per worker slot, kept across that slot's restarts.
        sockets: HashMap<usize, OwnedFd>,
    },
}

#[derive(Debug)]
pub(crate) struct Server {
    pub id: ServerId,
    pub key: ListenKey,
    pub addr: BoundAddr,
    pub backlog: u32,
    /// `TCP_DEFER_ACCEPT` is on (see [`Server::defer_accepts`]).
    pub defer_accept: bool,
    /// Workers granted this server that have not closed it.
    pub holders: HashSet<WorkerId>,
    pub kind: ServerKind,
    /// A socket path the master created and removes when the server closes.
    pub unix_path: Option<PathBuf>,
}

impl Server {
    /// Binds a new server for `spec` under `policy`.
    pub(crate) fn bind(
        id: ServerId,
        key: ListenKey,
        spec: &ListenSpec,
        policy: Policy,
        slot: usize,
        rr: &RoundRobinConfig,
    ) -> Result<Server, ListenError> {
        let policy = policy.effective(spec.addr.is_udp());
        let bound = bind::bind_spec(spec, policy == Policy::ReusePort)?;
        let unix_path = match &spec.addr {
            ListenAddr::Unix(p) => Some(p.clone()),
            _ => None,
        };
        Server::with_socket(id, key, spec, policy, slot, rr, bound, unix_path)
    }

    /// A server on a socket the master inherited (socket activation): not bound here, so its
    /// path is not the master's to remove, and since it cannot be bound again per slot,
    /// reuse-port serves it as shared.
    pub(crate) fn adopt(
        id: ServerId,
        key: ListenKey,
        spec: &ListenSpec,
        policy: Policy,
        rr: &RoundRobinConfig,
        socket: BoundSocket,
    ) -> Result<Server, ListenError> {
        let policy = match policy.effective(spec.addr.is_udp()) {
            Policy::ReusePort => Policy::Shared,
            other => other,
        };
        Server::with_socket(id, key, spec, policy, 0, rr, socket, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn with_socket(
        id: ServerId,
        key: ListenKey,
        spec: &ListenSpec,
        policy: Policy,
        slot: usize,
        rr: &RoundRobinConfig,
        bound: BoundSocket,
        unix_path: Option<PathBuf>,
    ) -> Result<Server, ListenError> {
        let BoundSocket { fd, addr } = bound;
        let kind = match policy {
            Policy::ReusePort => {
                let mut resolved = spec.clone();
                if let (ListenAddr::Tcp(a) | ListenAddr::Udp(a), BoundAddr::Inet(bound)) =
                    (&mut resolved.addr, &addr)
                {
                    *a = *bound;
                }
                ServerKind::ReusePort {
                    spec: resolved,
                    sockets: HashMap::from([(slot, fd)]),
                }
            }
            Policy::Shared => ServerKind::Shared { socket: fd },
            _ => {
                let socket = if matches!(spec.addr, ListenAddr::Unix(_)) {
                    AcceptSocket::Unix(UnixListener::from(fd))
                } else {
                    AcceptSocket::Tcp(std::net::TcpListener::from(fd))
                };
                ServerKind::RoundRobin {
                    socket,
                    handle: Box::new(RoundRobinHandle::new(id, *rr)),
                    backlogged: false,
                    after_answers: Vec::new(),
                }
            }
        };
        Ok(Server {
            id,
            key,
            addr,
            backlog: spec.backlog.unwrap_or(bind::DEFAULT_BACKLOG),
            // Set by the grant (`defer_accepts`), which also covers an inherited socket.
            defer_accept: false,
            holders: HashSet::new(),
            kind,
            unix_path,
        })
    }

    pub(crate) fn grant(&self) -> ServerGrant {
        match self.kind {
            ServerKind::RoundRobin { .. } => ServerGrant::RoundRobin,
            ServerKind::Shared { .. } => ServerGrant::Shared,
            ServerKind::ReusePort { .. } => ServerGrant::ReusePort,
        }
    }

    /// The socket a worker in `slot` receives with its grant (none for round-robin). For
    /// reuse-port the slot's own socket is bound on first use.
    pub(crate) fn socket_for(
        &mut self,
        slot: usize,
    ) -> Result<Option<BorrowedFd<'_>>, ListenError> {
        match &mut self.kind {
            ServerKind::RoundRobin { .. } => Ok(None),
            ServerKind::Shared { socket } => Ok(Some((*socket).as_fd())),
            ServerKind::ReusePort { spec, sockets } => {
                if let std::collections::hash_map::Entry::Vacant(e) = sockets.entry(slot) {
                    let bound = bind::bind_spec(spec, true)?;
                    e.insert(bound.fd);
                }
                Ok(sockets.get(&slot).map(|s| s.as_fd()))
            }
        }
    }

    /// Turns `TCP_DEFER_ACCEPT` on for this server's TCP sockets (and those bound for it later)
    /// once any worker asks for it or the master is set to; it stays on while the server
    /// lives. A failure leaves it to be tried again at the next grant.
    pub(crate) fn defer_accepts(&mut self) -> Result<(), ListenError> {
        if self.defer_accept || !matches!(self.key.addr, ListenAddr::Tcp(_)) {
            return Ok(());
        }
        match &mut self.kind {
            ServerKind::RoundRobin { socket, .. } => bind::set_defer_accept(socket.as_fd())?,
            ServerKind::Shared { socket } => bind::set_defer_accept(socket.as_fd())?,
            ServerKind::ReusePort { spec, sockets } => {
                sockets
                    .values()
                    .try_for_each(|s| bind::set_defer_accept(s.as_fd()))?;
                spec.defer_accept = true;
            }
        }
        self.defer_accept = true;
        Ok(())
    }

    /// Applies a larger backlog asked for by a later worker (Node keeps only the first).
    pub(crate) fn raise_backlog(&mut self, wanted: Option<u32>) -> Result<(), ListenError> {
        let Some(wanted) = wanted else { return Ok(()) };
        if wanted <= self.backlog {
            return Ok(());
        }
        self.backlog = wanted;
        match &self.kind {
            ServerKind::RoundRobin { socket, .. } => bind::set_backlog(socket.as_fd(), wanted),
            ServerKind::Shared { socket } if !self.key.addr.is_udp() => {
                bind::set_backlog(socket.as_fd(), wanted)
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The master bound this path, so it removes it (as Node does when the server closes).
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deferred(fd: BorrowedFd<'_>) -> bool {
        cluster_ipc::tcp_defer_accept(fd).unwrap() > 0
    }

    fn server(policy: Policy) -> Server {
        let spec = ListenSpec::tcp("127.0.0.1:0".parse().unwrap());
        Server::bind(
            ServerId(1),
            spec.key(0),
            &spec,
            policy,
            0,
            &RoundRobinConfig::default(),
        )
        .unwrap()
    }

    #[test]
    fn defer_accept_asked_later_reaches_the_round_robin_socket() {
        let mut s = server(Policy::RoundRobin);
        let ServerKind::RoundRobin { socket, .. } = &s.kind else {
            panic!("round-robin")
        };
        assert!(!deferred(socket.as_fd()));
        s.defer_accepts().unwrap();
        let ServerKind::RoundRobin { socket, .. } = &s.kind else {
            panic!("round-robin")
        };
        assert!(deferred(socket.as_fd()));
    }

    #[test]
    fn defer_accept_is_never_tried_on_udp_or_unix_sockets() {
        // TCP_DEFER_ACCEPT on either fails; the listen must not.
        let dir = std::env::temp_dir().join(format!("cluster-rs-defer-{}", std::process::id()));
        let specs = [
            ListenSpec::udp("127.0.0.1:0".parse().unwrap()),
            ListenSpec::unix(&dir),
        ];
        for spec in specs {
            let mut s = Server::bind(
                ServerId(1),
                spec.key(0),
                &spec,
                Policy::RoundRobin,
                0,
                &RoundRobinConfig::default(),
            )
            .unwrap();
            s.defer_accepts().unwrap();
        }
    }

    #[test]
    fn defer_accept_reaches_every_reuse_port_socket_bound_before_and_after() {
        let mut s = server(Policy::ReusePort);
        s.defer_accepts().unwrap();
        let later = s.socket_for(1).unwrap().map(deferred);
        assert_eq!(later, Some(true));
        assert_eq!(s.socket_for(0).unwrap().map(deferred), Some(true));
    }
}
