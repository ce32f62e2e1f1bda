use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where to listen. The variant fixes the transport.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A TCP socket on an IPv4 or IPv6 address; port 0 asks for any free port.
    Tcp(SocketAddr),
    /// A UDP socket; always shared (datagrams cannot be handed off one by one).
    Udp(SocketAddr),
    /// A Unix stream socket at a filesystem path.
    Unix(PathBuf),
    /// A listening stream socket the *master* already holds at this fd number (Node's
    /// `listen({fd})`), for example one inherited through systemd socket activation.
    Fd(i32),
}

impl ListenAddr {
    /// True for datagram sockets.
    pub fn is_udp(&self) -> bool {
        matches!(self, ListenAddr::Udp(_))
    }

    /// True when the OS picks the port (`listen(0)`), which is what makes Node's per-worker
    /// index part of the key.
    pub fn is_any_port(&self) -> bool {
        matches!(self, ListenAddr::Tcp(a) | ListenAddr::Udp(a) if a.port() == 0)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
            ListenAddr::Udp(a) => write!(f, "udp:{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Fd(fd) => write!(f, "fd:{fd}"),
        }
    }
}

/// What a worker asks for when it calls `listen`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ListenSpec {
    /// The address, and with it the transport.
    pub addr: ListenAddr,
    /// `IPV6_V6ONLY` for an IPv6 address: `false` accepts IPv4 too on `::`.
    pub ipv6_only: bool,
    /// The `listen(2)` backlog. The master uses the largest any worker asked for.
    pub backlog: Option<u32>,
    /// Bind in the worker itself and never share (Node's `exclusive: true`).
    pub exclusive: bool,
    /// TCP only: `TCP_DEFER_ACCEPT`, so a connection is accepted (and handed to a worker) only
    /// once its client has sent data. For protocols where the client speaks first (HTTP):
    /// the accept, the hand-off and the first read then happen in one go instead of a
    /// wake-up for the connection and another for its request. Never for protocols where the
    /// server speaks first (SMTP, SSH, ...): their clients would wait out the deferral (about
    /// a second). Not part of the key: the master sets it on the shared socket once any
    /// worker asks for it.
    pub defer_accept: bool,
}

impl ListenSpec {
    /// A TCP listen with default options.
    pub fn tcp(addr: SocketAddr) -> Self {
        Self::new(ListenAddr::Tcp(addr))
    }

    /// A UDP bind with default options.
    pub fn udp(addr: SocketAddr) -> Self {
        Self::new(ListenAddr::Udp(addr))
    }

    /// A Unix stream socket listen with default options.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::new(ListenAddr::Unix(path.into()))
    }

    /// A spec with default options: dual-stack, default backlog, shared.
    pub fn new(addr: ListenAddr) -> Self {
        Self {
            addr,
            ipv6_only: false,
            backlog: None,
            exclusive: false,
            defer_accept: false,
        }
    }

    /// This spec with [`defer_accept`](Self::defer_accept) set as given.
    pub fn defer_accept(mut self, on: bool) -> Self {
        self.defer_accept = on;
        self
    }

    /// The key under which the master shares this listen. `index` is the worker's count of its
    /// other open listens on the same address; it only matters for port 0, so that every
    /// worker's n-th `listen(0)` shares one port while unrelated `listen(0)`s get their own.
    pub fn key(&self, index: u32) -> ListenKey {
        ListenKey {
            addr: self.addr.clone(),
            ipv6_only: self.ipv6_only,
            index: if self.addr.is_any_port() { index } else { 0 },
        }
    }
}

/// Identifies one shared server in the master: Node's
/// `address:port:addressType:fd[:index]` (the index only for port 0, as upstream now does).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ListenKey {
    /// Address, port, family and transport (or the master's fd).
    pub addr: ListenAddr,
    /// Part of the key because a v6-only socket and a dual-stack one are different servers.
    pub ipv6_only: bool,
    /// The per-worker index for port 0 (always 0 otherwise).
    pub index: u32,
}

impl fmt::Display for ListenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if self.ipv6_only {
            f.write_str(":v6only")?;
        }
        if self.addr.is_any_port() {
            write!(f, "#{}", self.index)?;
        }
        Ok(())
    }
}

/// The address a server actually got, so that `listen(0)` reports the real port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BoundAddr {
    /// An IP socket address.
    Inet(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for BoundAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoundAddr::Inet(a) => a.fmt(f),
            BoundAddr::Unix(p) => p.display().fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_only_keys_port_zero() {
        let fixed = ListenSpec::tcp("127.0.0.1:8000".parse().unwrap());
        assert_eq!(fixed.key(0), fixed.key(3));
        let any = ListenSpec::tcp("127.0.0.1:0".parse().unwrap());
        assert_ne!(any.key(0), any.key(1));
        assert_eq!(any.key(1).to_string(), "tcp:127.0.0.1:0#1");
    }

    #[test]
    fn v6only_is_a_different_server() {
        let mut a = ListenSpec::tcp("[::]:8000".parse().unwrap());
        let dual = a.key(0);
        a.ipv6_only = true;
        assert_ne!(dual, a.key(0));
    }
}
