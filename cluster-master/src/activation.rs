//! Socket activation of the master: sockets that a service manager (systemd, or
//! `systemd-socket-activate`) opened and passed as `LISTEN_FDS` / `LISTEN_PID` /
//! `LISTEN_FDNAMES` become the master's own.
//!
//! An inherited socket is used where the master would otherwise bind: a worker's
//! `listen(addr)` whose address is an inherited socket's gets that socket (no bind, so no
//! `EADDRINUSE` against the manager's copy), and `--listen NAME` hands a named one to
//! `LISTEN_FDS` workers. The manager keeps its copy open across master restarts, so the
//! kernel keeps queueing connections while no master runs: none is refused.
//!
//! An inherited IPv6 wildcard socket that also accepts IPv4 (`[::]:PORT` without
//! `IPV6_V6ONLY`, which is what `systemd-socket-activate -l PORT` and a `ListenStream=PORT`
//! unit give) serves a worker's `listen` on `0.0.0.0:PORT` as well as on `[::]:PORT`: it
//! receives every connection either would.
//!
//! The table keeps the sockets for the master's lifetime and hands out duplicates: a server
//! closed (its last worker gone) and opened again gets the same socket back.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use cluster_core::{BoundAddr, ListenAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{SockType, SockaddrStorage, getsockname, getsockopt, sockopt};

use crate::bind::{BoundSocket, sockaddr_to_std};
use crate::sys;

/// The first inherited descriptor (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;
/// More than any sane unit passes; a larger count is taken as garbage.
const MAX_INHERITED: usize = 1024;

/// One inherited socket.
#[derive(Debug)]
pub(crate) struct Inherited {
    /// Its `LISTEN_FDNAMES` entry (`unknown` when none was given, as systemd names it).
    pub(crate) name: String,
    pub(crate) fd: OwnedFd,
    /// What it is bound to, in the terms a worker's `listen` uses; `None` for a kind of socket
    /// no worker could ask for (it can still be passed on by name).
    pub(crate) addr: Option<ListenAddr>,
    pub(crate) bound: BoundAddr,
    /// An IPv6 socket that accepts IPv4 too (`IPV6_V6ONLY` off).
    pub(crate) dual_stack: bool,
}

/// Set by the first [`take_from_env`]: the descriptors can be owned once per process.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The sockets this process inherited, if `LISTEN_PID` names it; empty otherwise, and for
/// every call after the first (a second master in the process gets none).
pub(crate) fn take_from_env() -> Vec<Inherited> {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Vec::new();
    }
    let var = |k: &str| std::env::var(k).ok();
    let Some(pid) = var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) else {
        return Vec::new();
    };
    let Some(count) = var("LISTEN_FDS").and_then(|n| n.parse::<usize>().ok()) else {
        return Vec::new();
    };
    // Meant for another process (an ancestor that did not clear them): not ours to take.
    if pid != std::process::id() || count > MAX_INHERITED {
        return Vec::new();
    }
    take(count, var("LISTEN_FDNAMES").as_deref())
}

fn take(count: usize, names: Option<&str>) -> Vec<Inherited> {
    let names: Vec<&str> = names.map(|n| n.split(':').collect()).unwrap_or_default();
    (0..count)
        .filter_map(|i| {
            let raw = FIRST_FD.checked_add(i32::try_from(i).ok()?)?;
            let fd = sys::take_inherited_fd(raw).ok()?;
            let name = names.get(i).copied().unwrap_or("unknown").to_owned();
            let (addr, bound) =
                describe(&fd).unwrap_or((None, BoundAddr::Unix(Default::default())));
            let dual_stack = is_dual_stack(&fd, addr.as_ref());
            Some(Inherited {
                name,
                fd,
                addr,
                bound,
                dual_stack,
            })
        })
        .collect()
}

/// Whether `fd`, bound to `addr`, is an IPv6 socket that accepts IPv4 too.
fn is_dual_stack(fd: &OwnedFd, addr: Option<&ListenAddr>) -> bool {
    let is_v6 = matches!(
        addr,
        Some(
            ListenAddr::Tcp(std::net::SocketAddr::V6(_))
                | ListenAddr::Udp(std::net::SocketAddr::V6(_))
        )
    );
    is_v6 && getsockopt(fd, sockopt::Ipv6V6Only).is_ok_and(|v6_only| !v6_only)
}

/// Whether an inherited socket bound to `have` serves a `listen` on `want`: the same
/// address, or a dual-stack `[::]:P` for `0.0.0.0:P`.
fn serves(have: &ListenAddr, dual_stack: bool, want: &ListenAddr) -> bool {
    use std::net::SocketAddr;
    let wildcard_v4_for_v6 = |h: &SocketAddr, w: &SocketAddr| {
        dual_stack
            && h.ip() == std::net::Ipv6Addr::UNSPECIFIED
            && w.ip() == std::net::Ipv4Addr::UNSPECIFIED
            && h.port() == w.port()
    };
    have == want
        || match (have, want) {
            (ListenAddr::Tcp(h), ListenAddr::Tcp(w)) | (ListenAddr::Udp(h), ListenAddr::Udp(w)) => {
                wildcard_v4_for_v6(h, w)
            }
            _ => false,
        }
}

/// What `fd` is bound to.
fn describe(fd: &OwnedFd) -> io::Result<(Option<ListenAddr>, BoundAddr)> {
    let kind = getsockopt(fd, sockopt::SockType).map_err(io::Error::from)?;
    let local: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(io::Error::from)?;
    if let Some(inet) = sockaddr_to_std(&local) {
        let addr = match kind {
            SockType::Stream => Some(ListenAddr::Tcp(inet)),
            SockType::Datagram => Some(ListenAddr::Udp(inet)),
            _ => None,
        };
        return Ok((addr, BoundAddr::Inet(inet)));
    }
    if let Some(path) = local.as_unix_addr().and_then(|u| u.path()) {
        let addr = (kind == SockType::Stream).then(|| ListenAddr::Unix(path.to_path_buf()));
        return Ok((addr, BoundAddr::Unix(path.to_path_buf())));
    }
    Ok((None, BoundAddr::Unix(Default::default())))
}

/// The master's inherited sockets.
#[derive(Debug, Default)]
pub(crate) struct Activation {
    sockets: Vec<Inherited>,
}

impl Activation {
    pub(crate) fn new(sockets: Vec<Inherited>) -> Activation {
        Activation { sockets }
    }

    /// Name and address of each, for the log.
    pub(crate) fn describe(&self) -> Vec<(String, BoundAddr)> {
        self.sockets
            .iter()
            .map(|s| (s.name.clone(), s.bound.clone()))
            .collect()
    }

    fn dup(s: &Inherited) -> io::Result<BoundSocket> {
        let fd = s.fd.as_fd().try_clone_to_owned()?;
        // The master accepts and reads without blocking; the manager's copy shares the flag,
        // which a blocking manager-side user would notice, but systemd never reads it.
        let flags =
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        Ok(BoundSocket {
            fd,
            addr: s.bound.clone(),
        })
    }

    /// A duplicate of the inherited socket that serves `addr`, if there is one: bound to
    /// exactly `addr`, or else a dual-stack `[::]:P` for `0.0.0.0:P`.
    pub(crate) fn for_addr(&self, addr: &ListenAddr) -> Option<io::Result<BoundSocket>> {
        let exact = self.sockets.iter().find(|s| s.addr.as_ref() == Some(addr));
        let s = exact.or_else(|| {
            self.sockets.iter().find(|s| {
                s.addr
                    .as_ref()
                    .is_some_and(|have| serves(have, s.dual_stack, addr))
            })
        })?;
        Some(Activation::dup(s))
    }

    /// A duplicate of the inherited socket named `name`, if there is one.
    pub(crate) fn for_name(&self, name: &str) -> Option<io::Result<BoundSocket>> {
        let s = self.sockets.iter().find(|s| s.name == name)?;
        Some(Activation::dup(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_tcp_udp_and_unix_sockets() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let (a, b) = describe(&OwnedFd::from(tcp)).unwrap();
        assert_eq!(a, Some(ListenAddr::Tcp(addr)));
        assert_eq!(b, BoundAddr::Inet(addr));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        assert_eq!(
            describe(&OwnedFd::from(udp)).unwrap().0,
            Some(ListenAddr::Udp(addr))
        );
        let path = std::env::temp_dir().join(format!("cluster-rs-act-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(
            describe(&OwnedFd::from(unix)).unwrap().0,
            Some(ListenAddr::Unix(path.clone()))
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn hands_out_duplicates_by_address_and_name() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let act = Activation::new(vec![Inherited {
            name: "web".into(),
            fd: OwnedFd::from(tcp),
            addr: Some(ListenAddr::Tcp(addr)),
            bound: BoundAddr::Inet(addr),
            dual_stack: false,
        }]);
        let a = act.for_addr(&ListenAddr::Tcp(addr)).unwrap().unwrap();
        let b = act.for_name("web").unwrap().unwrap();
        assert_ne!(a.fd.as_raw_fd(), b.fd.as_raw_fd());
        assert!(act.for_name("other").is_none());
        let elsewhere: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(act.for_addr(&ListenAddr::Tcp(elsewhere)).is_none());
        // Both are the one socket: a client connecting is accepted through either.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let listener = std::net::TcpListener::from(a.fd);
        listener.set_nonblocking(false).unwrap();
        assert!(listener.accept().is_ok());
    }

    fn inherited(fd: OwnedFd) -> Inherited {
        let (addr, bound) = describe(&fd).unwrap();
        let dual_stack = is_dual_stack(&fd, addr.as_ref());
        Inherited {
            name: "unknown".into(),
            fd,
            addr,
            bound,
            dual_stack,
        }
    }

    /// An IPv6 wildcard TCP socket on an ephemeral port, with `IPV6_V6ONLY` as given.
    fn v6_wildcard(v6_only: bool) -> Option<(OwnedFd, u16)> {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockaddrIn6, bind, listen, setsockopt, socket,
        };
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .ok()?;
        setsockopt(&fd, sockopt::Ipv6V6Only, &v6_only).unwrap();
        let any = SockaddrIn6::from(std::net::SocketAddrV6::new(
            std::net::Ipv6Addr::UNSPECIFIED,
            0,
            0,
            0,
        ));
        // No IPv6 on this machine: nothing to test.
        bind(fd.as_raw_fd(), &any).ok()?;
        listen(&fd, nix::sys::socket::Backlog::new(8).unwrap()).unwrap();
        let port = std::net::TcpListener::from(fd.try_clone().unwrap())
            .local_addr()
            .unwrap()
            .port();
        Some((fd, port))
    }

    #[test]
    fn a_dual_stack_wildcard_serves_the_ipv4_wildcard_too() {
        let Some((fd, port)) = v6_wildcard(false) else {
            return;
        };
        let act = Activation::new(vec![inherited(fd)]);
        let v4 = |p: u16| ListenAddr::Tcp(format!("0.0.0.0:{p}").parse().unwrap());
        let v6 = |p: u16| ListenAddr::Tcp(format!("[::]:{p}").parse().unwrap());
        assert!(act.for_addr(&v6(port)).is_some());
        assert!(act.for_addr(&v4(port)).is_some());
        assert!(act.for_addr(&v4(port.wrapping_add(1))).is_none());
        let udp = ListenAddr::Udp(format!("0.0.0.0:{port}").parse().unwrap());
        assert!(act.for_addr(&udp).is_none());
        let loopback = ListenAddr::Tcp(format!("127.0.0.1:{port}").parse().unwrap());
        assert!(act.for_addr(&loopback).is_none());
        // IPv6 only: IPv4 clients would never reach it.
        let (fd, port) = v6_wildcard(true).unwrap();
        let act = Activation::new(vec![inherited(fd)]);
        assert!(act.for_addr(&v6(port)).is_some());
        assert!(act.for_addr(&v4(port)).is_none());
    }
}
